"""Teacher clients against real teachers: the bundle's weights in process, and MLServer over OIP v2 REST.

MLServer runs from its own venv (``make mlserver``) on 127.0.0.1, serving the tiny bundle's teacher twice:
through mlserver-huggingface (label/score lists, the `labels` output) and through a runtime of ours that
answers an FP32 logits tensor (the `tensor` output). No Ray.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from bundle.model import open_model
from bundle.registry import Bundle, Registry
from bundle.teachers import (
    LocalTeacher,
    RemoteTeacher,
    RemoteTeacherSettings,
    TeacherSpec,
    TeacherUnavailable,
    open_teacher,
    teacher_logits_sync,
)
from routing.breaker import CircuitBreaker
from tests.servers import MLServer, free_port, hf_model_settings, hf_teacher_folder, logits_model_settings

pytestmark = pytest.mark.integration  # the tiny bundle (a model build) and MLServer in a subprocess

TEXTS = ["a moving, beautifully acted film", "dull and far too long", "not bad at all", "I walked out",
         "the best thing I saw this year", "an utter mess"]


@pytest.fixture(scope="module")
def bundle(tiny_home: Path) -> Bundle:
    return Registry(tiny_home).load()


@pytest.fixture(scope="module")
def local(bundle: Bundle) -> LocalTeacher:
    return open_model("local", bundle.path, bundle.manifest.labels, bundle.manifest.max_length)


@pytest.fixture(scope="module")
def server(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    work = tmp_path_factory.mktemp("mlserver")
    folder = hf_teacher_folder(bundle.path, work / "hf-teacher")
    models = {"teacher-hf": hf_model_settings("teacher-hf", folder),
              "teacher-logits": logits_model_settings("teacher-logits", folder, bundle.manifest.max_length)}
    server = MLServer(work / "models", models)
    server.start()
    yield server
    server.stop()


def hf_settings(server: MLServer, labels: list[str], **extra) -> RemoteTeacherSettings:
    """How a user points Cascade at mlserver-huggingface: the texts as one list, every label's score."""
    return RemoteTeacherSettings(url=server.url, model="teacher-hf", output="labels", input_name="array_inputs",
                                 extra_inputs=[{"name": "top_k", "datatype": "INT32", "shape": [1],
                                                "data": [len(labels)]}], **extra)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def served_requests(server: MLServer, model: str) -> float:
    """How many inference requests MLServer counted for a model (its own Prometheus counter)."""
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).text
    pattern = rf'^model_infer_request_success_total{{[^}}]*model="{re.escape(model)}"[^}}]*}} ([0-9.e+]+)$'
    return sum(float(m) for m in re.findall(pattern, text, flags=re.M))


# -- the local teacher ---------------------------------------------------------------------------------------


def test_local_teacher_answers_in_label_order_and_reads_the_manifest(bundle: Bundle, local: LocalTeacher) -> None:
    logits = asyncio.run(local.predict(TEXTS))
    assert logits.shape == (len(TEXTS), len(bundle.manifest.labels))
    direct = local.runtime.logits(TEXTS)
    np.testing.assert_allclose(logits, direct, atol=1e-4)  # length-sorted batching changes nothing
    opened = open_teacher(bundle.manifest.teacher, bundle.path, bundle.manifest.labels)
    assert isinstance(opened, LocalTeacher) and opened.identity == local.identity and opened.device == "cpu"


def test_the_onnx_teacher_answers_the_same_labels_as_pytorch(bundle: Bundle, local: LocalTeacher) -> None:
    """The gateway's local teacher on either runtime: the build's fp32 export matches PyTorch within 1e-4."""
    onnx = open_model("local", bundle.path, bundle.manifest.labels, bundle.manifest.max_length, runtime="onnx")
    torch_teacher = open_model("local", bundle.path, bundle.manifest.labels, bundle.manifest.max_length,
                               runtime="torch")
    assert (local.runtime_kind, onnx.runtime_kind, torch_teacher.runtime_kind) == ("onnx", "onnx", "torch")
    texts = TEXTS * 3 + ["", "!!!", "a " * 80]  # padded batches of uneven length, an empty text, a truncated one
    on_onnx, on_torch = asyncio.run(onnx.predict(texts)), asyncio.run(torch_teacher.predict(texts))
    np.testing.assert_allclose(on_onnx, on_torch, atol=1e-4)
    assert (on_onnx.argmax(-1) == on_torch.argmax(-1)).all()
    assert onnx.identity == torch_teacher.identity  # one teacher: answers cached under either are shared
    assert bundle.manifest.metrics["teacher_onnx"]["onnx_vs_torch_max_abs_diff"] < 1e-4


def test_a_bundle_without_the_onnx_export_runs_its_teacher_on_pytorch(bundle: Bundle, tmp_path: Path) -> None:
    import shutil

    from bundle.runtime import TEACHER_ONNX_FILE

    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy, ignore=shutil.ignore_patterns(TEACHER_ONNX_FILE))
    labels, length = bundle.manifest.labels, bundle.manifest.max_length
    assert open_model("local", copy, labels, length).runtime_kind == "torch"
    with pytest.raises(FileNotFoundError, match=f"no {TEACHER_ONNX_FILE} in this bundle"):
        open_model("local", copy, labels, length, runtime="onnx")


def test_cuda_without_a_gpu_is_a_clear_error(bundle: Bundle) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no GPU"):
        open_model("local", bundle.path, bundle.manifest.labels, bundle.manifest.max_length, device="cuda")
    auto = open_model("local", bundle.path, bundle.manifest.labels, bundle.manifest.max_length, device="auto")
    assert auto.device == "cpu"


def test_a_bundle_without_teacher_weights_says_so(bundle: Bundle, tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="no teacher weights"):
        open_model("local", tmp_path, bundle.manifest.labels, 32)


def test_teacher_labels_that_do_not_match_are_refused(bundle: Bundle) -> None:
    with pytest.raises(ValueError, match="do not match"):
        open_model("local", bundle.path, ["spam", "ham"], bundle.manifest.max_length)


def test_remote_spec_needs_its_server() -> None:
    with pytest.raises(ValidationError, match="needs a `remote` section"):
        TeacherSpec(kind="remote")


# -- the remote teacher on MLServer --------------------------------------------------------------------------


def test_mlserver_huggingface_label_lists_give_the_teachers_log_probabilities(bundle: Bundle, local: LocalTeacher,
                                                                               server: MLServer) -> None:
    labels = bundle.manifest.labels
    remote = RemoteTeacher(hf_settings(server, labels, batch_size=4), labels)
    answered = teacher_logits_sync(remote, TEXTS)  # two HTTP calls of at most 4 texts, concurrently
    # The server answers probabilities by label name; as log-probabilities they equal the local teacher's.
    np.testing.assert_allclose(answered, log_softmax(asyncio.run(local.predict(TEXTS))), atol=1e-4)
    assert asyncio.run(remote.ready())


def test_only_the_top_label_spreads_the_rest_evenly(bundle: Bundle, local: LocalTeacher, server: MLServer) -> None:
    """Without top_k, mlserver-huggingface answers only the top label: with two labels the rest is exact."""
    labels = bundle.manifest.labels
    remote = RemoteTeacher(RemoteTeacherSettings(url=server.url, model="teacher-hf", output="labels",
                                                 input_name="array_inputs"), labels)
    np.testing.assert_allclose(teacher_logits_sync(remote, TEXTS), log_softmax(asyncio.run(local.predict(TEXTS))),
                               atol=1e-4)


def test_a_tensor_output_is_read_in_the_servers_label_order(bundle: Bundle, local: LocalTeacher,
                                                            server: MLServer) -> None:
    labels = bundle.manifest.labels
    expected = asyncio.run(local.predict(TEXTS))
    remote = RemoteTeacher(RemoteTeacherSettings(url=server.url, model="teacher-logits"), labels)
    np.testing.assert_allclose(teacher_logits_sync(remote, TEXTS), expected, atol=1e-4)
    # A server whose columns are in another order says so with label_names; the answer comes back in ours.
    swapped = RemoteTeacher(RemoteTeacherSettings(url=server.url, model="teacher-logits",
                                                  label_names=labels[::-1]), labels)
    np.testing.assert_allclose(teacher_logits_sync(swapped, TEXTS), expected[:, ::-1], atol=1e-4)
    # Probabilities become log-probabilities (here the logits read as if they were probabilities, clipped).
    as_probs = RemoteTeacher(RemoteTeacherSettings(url=server.url, model="teacher-logits", scores="probabilities",
                                                   output_name="logits"), labels)
    np.testing.assert_allclose(teacher_logits_sync(as_probs, TEXTS), np.log(np.clip(expected, 1e-12, None)),
                               atol=1e-4)


def test_labels_the_bundle_does_not_know_are_an_error_naming_the_url(server: MLServer) -> None:
    remote = RemoteTeacher(hf_settings(server, ["neg", "pos"], retries=0), ["neg", "pos"])
    with pytest.raises(TeacherUnavailable, match=re.escape(server.url) + ".*not one of the bundle's labels"):
        teacher_logits_sync(remote, TEXTS[:2])


def test_a_wrong_model_name_is_refused_without_retries(bundle: Bundle, server: MLServer) -> None:
    breaker = CircuitBreaker(failure_threshold=10)
    remote = RemoteTeacher(RemoteTeacherSettings(url=server.url, model="no-such-model", retries=3),
                           bundle.manifest.labels, breaker)
    with pytest.raises(TeacherUnavailable, match="HTTP 404"):
        teacher_logits_sync(remote, TEXTS[:1])
    assert breaker.failures == 1  # one call, not four
    assert not asyncio.run(remote.ready())


def test_the_answer_cache_spares_the_server(bundle: Bundle, server: MLServer, tmp_path: Path) -> None:
    labels = bundle.manifest.labels
    remote = RemoteTeacher(RemoteTeacherSettings(url=server.url, model="teacher-logits", batch_size=64), labels)
    before = served_requests(server, "teacher-logits")
    first = teacher_logits_sync(remote, TEXTS, tmp_path)
    assert served_requests(server, "teacher-logits") == before + 1
    again = teacher_logits_sync(remote, list(reversed(TEXTS)), tmp_path)  # all cached: no call
    assert served_requests(server, "teacher-logits") == before + 1
    np.testing.assert_array_equal(again, first[::-1])
    teacher_logits_sync(remote, [*TEXTS, "one new text"], tmp_path)  # only the new text goes out
    assert served_requests(server, "teacher-logits") == before + 2


# -- failures: retries, the circuit breaker ------------------------------------------------------------------


def test_an_unreachable_server_fails_then_the_breaker_fails_fast(bundle: Bundle) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    remote = RemoteTeacher(RemoteTeacherSettings(url=url, model="teacher", retries=1), bundle.manifest.labels,
                           CircuitBreaker(failure_threshold=3, cooldown_s=60))

    async def calls() -> list[str]:
        errors = []
        for _ in range(3):
            with pytest.raises(TeacherUnavailable) as caught:
                await remote.predict(TEXTS[:1])
            errors.append(str(caught.value))
        await remote.close()
        return errors

    first, second, third = asyncio.run(calls())
    assert url in first and "ConnectError" in first and "ConnectError" in second
    # Call 1 (2 attempts) and call 2 (1 attempt) open the breaker after 3 failures; call 3 never connects.
    assert "circuit breaker open" in third and url in third
    assert remote.state()["breaker"] == "open" and not asyncio.run(remote.ready())


def test_the_breaker_closes_when_the_server_answers_again(bundle: Bundle, server: MLServer) -> None:
    """Same client: broken while pointed at a dead port, then healthy once the server is there (one probe)."""
    labels = bundle.manifest.labels
    settings = RemoteTeacherSettings(url=f"http://127.0.0.1:{free_port()}", model="teacher-logits", retries=0)
    remote = RemoteTeacher(settings, labels, CircuitBreaker(failure_threshold=2, cooldown_s=0.3))

    async def scenario() -> tuple[str, str, np.ndarray]:
        for _ in range(2):
            with pytest.raises(TeacherUnavailable):
                await remote.predict(TEXTS[:1])
        opened = remote.state()["breaker"]
        # The server comes back (here: the client is pointed at a live one, as a restart on the port would be).
        remote.infer_url = f"{server.url}/v2/models/teacher-logits/infer"
        with pytest.raises(TeacherUnavailable, match="circuit breaker open"):
            await remote.predict(TEXTS[:1])  # still open: not even tried
        await asyncio.sleep(0.35)
        answer = await remote.predict(TEXTS[:2])  # the half-open probe succeeds
        await remote.close()
        return opened, remote.state()["breaker"], answer

    opened, closed, answer = asyncio.run(scenario())
    assert (opened, closed) == ("open", "closed") and answer.shape == (2, len(labels))
