import torch
import torch.nn.functional as F

from distill import train
from distill.config import BuildConfig
from distill.data import LABELS


def test_distillation_loss_matches_its_formula() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 2), torch.randn(8, 2)
    labels = torch.randint(0, 2, (8,))
    alpha, temperature = 0.3, 2.0
    expected_kl = (F.softmax(teacher / temperature, -1)
                   * (F.log_softmax(teacher / temperature, -1) - F.log_softmax(student / temperature, -1))
                   ).sum(-1).mean()
    expected = alpha * F.cross_entropy(student, labels) + (1 - alpha) * temperature**2 * expected_kl
    got = train.distillation_loss(alpha, temperature)(student, labels, teacher)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(train.distillation_loss(1.0, 2.0)(student, labels, teacher), F.cross_entropy(student, labels))
    assert train.distillation_loss(0.0, 2.0)(teacher, labels, teacher).abs() < 1e-6


def test_student_is_initialised_from_evenly_spaced_teacher_layers() -> None:
    teacher = train.new_teacher(LABELS, BuildConfig())
    student = train.student_from_teacher(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 6
    t_layers, s_layers = teacher.bert.encoder.layer, student.bert.encoder.layer
    assert torch.equal(s_layers[0].attention.self.query.weight, t_layers[0].attention.self.query.weight)
    assert torch.equal(s_layers[1].output.dense.weight, t_layers[5].output.dense.weight)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert not student.training
