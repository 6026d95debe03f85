"""Teacher fine-tuning on cached lower layers, the hidden-state loss, narrower students, class weights.

Tiny random models of both families the build trains (BERT and MPNet): no weights are downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill import frozen, train
from distill.data import Dataset

TEXTS = ["a gripping and funny film", "dull, slow and far too long", "the cast is wonderful",
         "i wanted my two hours back", "a warm, clever story", "nothing works here at all",
         "bright and moving", "a tedious mess"] * 2
LABELS = np.array([1, 0, 1, 0, 1, 0, 1, 0] * 2)


def _tokenizer():
    return train.load_tokenizer(train.base_model_dir())


def _tiny(family: str, hidden: int = 64, layers: int = 4, seed: int = 0):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=30528, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=hidden // 32, intermediate_size=hidden * 2, num_labels=2,
                                  max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_answers_from_cached_lower_layers_equal_a_full_forward_pass(family: str) -> None:
    model, tokenizer = _tiny(family), _tokenizer()
    cache = frozen.lower_states(model, tokenizer, TEXTS, 32, frozen_layers=2, precision="fp32", batch_size=5)
    cached = frozen.cached_features(model, cache, frozen_layers=2, batch_size=3)
    full = train.predict_logits(model, tokenizer, TEXTS, 32)
    np.testing.assert_allclose(cached, full, atol=1e-4)
    assert len(model.base_model.encoder.layer) == 4  # the layer slice is put back


def test_only_the_layers_above_the_frozen_ones_learn() -> None:
    model, tokenizer = _tiny("mpnet"), _tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = frozen.lower_states(model, tokenizer, TEXTS, 32, frozen_layers=3, precision="fp32")
    frozen.fit_upper(model, cache, LABELS, cache, LABELS, frozen_layers=3, epochs=2, lr=1e-3, batch_size=4,
                     seed=0, precision="fp32")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".layer.3." in k or k.startswith("classifier") for k in changed)


def test_the_hidden_state_loss_falls_when_a_tiny_student_learns_a_tiny_teacher() -> None:
    """Teacher and student of different widths (96 and 64) and families: the projection bridges them."""
    teacher, student, tokenizer = _tiny("mpnet", hidden=96, seed=1), _tiny("bert", hidden=64, layers=2), _tokenizer()
    targets = train.predict_logits(teacher, tokenizer, TEXTS, 32, pooled=True)
    assert targets.shape == (len(TEXTS), 2 + 96)
    hidden = train.HiddenStateDistillation(64, 96, weight=1.0)

    def hidden_loss() -> float:
        batch = train.encode(tokenizer, TEXTS, 32)
        with torch.no_grad():
            states = student(**batch, output_hidden_states=True).hidden_states[-1]
            return float(hidden.loss(states, batch["attention_mask"], torch.from_numpy(targets[:, 2:])))

    data = Dataset("tiny", TEXTS, LABELS)
    start = hidden_loss()
    train.fit(student, tokenizer, data, data, epochs=6, lr=3e-3, batch_size=8, max_length=32,
              loss_fn=train.distillation_loss(0.0, 2.0), soft_targets=targets, hidden=hidden, seed=0)
    assert hidden_loss() < 0.5 * start


def test_a_narrowed_student_keeps_whole_heads_and_the_leading_units() -> None:
    wide = _tiny("bert", hidden=128, layers=2)
    narrow = train.narrowed(wide, 64)
    assert narrow.config.hidden_size == 64 and narrow.config.num_attention_heads == 2
    assert narrow.config.intermediate_size == 128
    assert torch.equal(narrow.bert.encoder.layer[1].attention.self.query.weight,
                       wide.bert.encoder.layer[1].attention.self.query.weight[:64, :64])
    assert narrow(**train.encode(_tokenizer(), TEXTS[:2], 16)).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="multiple of the head width 32"):
        train.narrowed(wide, 48)


def test_class_weights_lift_a_rare_label_and_keep_the_mean_weight_at_one() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    balanced = train.class_weights(labels, 2, "balanced")
    root = train.class_weights(labels, 2, "sqrt")
    assert train.class_weights(labels, 2, "none") is None
    for weights in (balanced, root):
        assert float(weights[labels].mean()) == pytest.approx(1.0)
    assert float(balanced[1] / balanced[0]) == pytest.approx(9.0)
    assert float(root[1] / root[0]) == pytest.approx(3.0)
