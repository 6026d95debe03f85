"""The `cascade` command. Each command imports what it needs when it runs, so `cascade serve` never
loads training code and `cascade build` never starts Ray."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from distill.config import BuildConfig, cascade_home

if TYPE_CHECKING:
    from distill.data import Dataset

app = typer.Typer(help="Cascade: a distilled int8 student first, the teacher only when the student is unsure.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

Home = Annotated[Path | None, typer.Option("--home", help="Model home (default $CASCADE_HOME or ./models).")]
Tiny = Annotated[bool, typer.Option("--tiny", help="Tiny models on a few hundred texts (for tests).")]


def _home(home: Path | None) -> Path:
    return (home or cascade_home()).resolve()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def build(
    home: Home = None,
    tiny: Tiny = False,
    preset: Annotated[str | None, typer.Option("--preset", help="Settings to start from: full (default: MPNet-base "
                                               "teacher), minilm (the MiniLM-L6 teacher) or tiny (= --tiny).")
                      ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Build configuration YAML (every setting; "
                                                "`--print-config` shows them). The flags below override it.")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved configuration as YAML "
                                               "and exit (with no other option: the defaults).")] = False,
    data: Annotated[Path | None, typer.Option("--data", help="Your labelled texts: CSV, TSV, JSONL (Parquet "
                                              "with pyarrow). Default: the movie-review snippets.")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Your own validation file (else split from --data).")
                   ] = None,
    test: Annotated[Path | None, typer.Option("--test", help="Your own test file (else split from --data).")] = None,
    text_column: Annotated[str | None, typer.Option(help="Column of the texts (default: text).")] = None,
    label_column: Annotated[str | None, typer.Option(help="Column of the labels (default: label).")] = None,
    labels: Annotated[str | None, typer.Option(help="Label names in answer order, comma-separated "
                                               "(default: those in the data, sorted).")] = None,
    if_missing: Annotated[bool, typer.Option("--if-missing", help="Do nothing if a current bundle exists.")] = False,
    promote: Annotated[bool, typer.Option(help="Make the new bundle current.")] = True,
) -> None:
    """Fit or load the teacher, distill and quantize the student, calibrate, evaluate and register a bundle."""
    overrides = {key: value for key, value in {
        "path": data and str(data.resolve()), "val": val and str(val.resolve()), "test": test and str(test.resolve()),
        "text_column": text_column, "label_column": label_column,
        "labels": labels and [name.strip() for name in labels.split(",") if name.strip()],
    }.items() if value is not None}
    cfg = _build_config(config, tiny, preset, overrides)
    if print_config:
        from distill.config import config_yaml

        typer.echo(config_yaml(cfg), nl=False)
        return
    home = _home(home)
    if if_missing and _has_usable_current(home):
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from distill.build import build as run_build
    from distill.config import BuildInputError
    from distill.evaluate import format_report

    try:
        bundle = run_build(cfg, home, promote=promote)
    except BuildInputError as exc:
        _fail(str(exc))
    report = json.loads((bundle.path / "report.json").read_text())
    typer.echo(format_report(report, default_task=cfg.data.path is None))
    typer.echo(f"\nbuilt {bundle.version} in {report['build_seconds'] / 60:.1f} min -> {bundle.path}")


def _build_config(config: Path | None, tiny: bool, preset: str | None, data: dict[str, object]) -> BuildConfig:
    """The build's settings: the YAML file or the preset, then the data flags over them; a bad value ends the
    command with one line naming the setting (pydantic's message)."""
    from distill.config import BuildInputError, load_config_file

    try:
        cfg = load_config_file(config, tiny, preset) if config else BuildConfig.preset(tiny, preset)
        return cfg.merged({"data": data}) if data else cfg
    except BuildInputError as exc:
        _fail(str(exc))
    except ValueError as exc:  # a flag's value the settings refuse (pydantic names the setting)
        _fail(str(exc).replace("\n", " "))
    raise AssertionError("unreachable: _fail exits")


def _has_usable_current(home: Path) -> bool:
    """`build --if-missing`: whether a current bundle exists and loads (checksums verified); one that does not
    is rebuilt, with the reason printed."""
    from bundle.registry import BundleError, Registry

    registry = Registry(home)
    if not registry.current_version():
        return False
    try:
        registry.load()
    except BundleError as exc:
        typer.echo(f"current bundle is unusable ({exc}); rebuilding")
        return False
    typer.echo(f"current bundle {registry.current_version()} is present in {home}; nothing to build")
    return True


@app.command("eval")
def evaluate(
    home: Home = None,
    version: Annotated[str | None, typer.Option(help="Registry version (default: current).")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="Evaluate on the tiny subset (tests).")] = False,
    save: Annotated[bool, typer.Option(help="Store the measurements in the bundle's report.json.")] = True,
) -> None:
    """Measure a bundle on the test split now: accuracies with bootstrap CIs, operating point, speed, size."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bundle.registry import BundleError, Registry
    from distill.build import splits_for
    from distill.config import BuildInputError
    from distill.evaluate import evaluate_bundle, format_report

    try:
        bundle = Registry(_home(home)).load(version)
    except BundleError as exc:
        _fail(str(exc))
    cfg = BuildConfig.model_validate(bundle.manifest.build)  # the data and settings the bundle was built with
    if tiny:
        preset = BuildConfig.preset(True)
        cfg = cfg.merged({"data": preset.data.model_dump(include={"train_limit", "eval_limit"}),
                          "evaluation": preset.evaluation.model_dump()})
    try:
        splits = splits_for(cfg)
    except BuildInputError as exc:
        _fail(str(exc))
    evaluation = evaluate_bundle(bundle, splits, bootstrap_samples=cfg.evaluation.bootstrap_samples,
                                 latency_runs=cfg.evaluation.latency_runs, threads=cfg.threads)
    report_path = bundle.path / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["evaluation"] = evaluation
    if save:
        report_path.write_text(json.dumps(report, indent=2))
    typer.echo(format_report(report, default_task=cfg.data.path is None))


@app.command()
def calibrate(
    home: Home = None,
    version: Annotated[str | None, typer.Option(help="Registry version (default: current).")] = None,
    teacher_share: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Send this share of texts to the teacher instead of targeting agreement.")] = None,
    target_agreement: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Smallest teacher share whose answers agree with the teacher this often (on "
        "val: at the lower end of the interval at the bundle's calibration.level).")] = 0.97,
    from_queue: Annotated[bool, typer.Option("--from-queue", help="Calibrate on recent live traffic (the queue's "
                                             "shadow and fallback records) instead of val: the target must hold on "
                                             "the 95% interval's lower bound.")] = False,
    queue: Annotated[str | None, typer.Option("--queue", help="Queue URL (with --from-queue; default as for "
                                              "`cascade queue`).")] = None,
    since: Annotated[str | None, typer.Option(help="With --from-queue: only records this recent (e.g. 24h).")] = None,
) -> None:
    """Pick the deferral threshold (on val, or on live traffic) and write it into the bundle's manifest; a
    running gateway picks it up on its next poll."""
    import numpy as np

    if from_queue:
        _calibrate_from_queue(_home(home), version, queue, target_agreement, _duration_s(since) if since else None)
        return

    from bundle.registry import BundleError, Registry
    from distill.build import CALIBRATION_FILE
    from distill.evaluate import operating_curve_png, pick_operating_point
    from routing.confidence import ConfidenceMeasure, softmax

    registry = Registry(_home(home))
    try:
        bundle = registry.load(version)
    except BundleError as exc:
        _fail(str(exc))
    manifest = bundle.manifest
    with np.load(bundle.path / CALIBRATION_FILE, allow_pickle=False) as saved:
        student_logits, teacher_logits, labels = saved["student_logits"], saved["teacher_logits"], saved["labels"]
    chosen, points = pick_operating_point(
        softmax(student_logits, manifest.temperatures.student), softmax(teacher_logits, manifest.temperatures.teacher),
        labels, ConfidenceMeasure(manifest.confidence_measure),
        target_agreement=None if teacher_share is not None else target_agreement, teacher_share=teacher_share,
        level=BuildConfig.model_validate(manifest.build).calibration.level,
    )
    registry.save_manifest(bundle, manifest.model_copy(update={"threshold": chosen.threshold}))
    curve = bundle.path / "operating_curve.calibrate.png"
    operating_curve_png(points, chosen, curve, "Deferral sweep on val")
    typer.echo(json.dumps({"version": bundle.version, "threshold": chosen.threshold,
                           "val_teacher_share": chosen.teacher_share,
                           "val_agreement_with_teacher": chosen.agreement_with_teacher,
                           "val_accuracy": chosen.accuracy, "curve": str(curve)}, indent=2))


def _calibrate_from_queue(home: Path, version: str | None, queue: str | None, target: float,
                          since_s: float | None) -> None:
    """The cheapest threshold whose live agreement's 95% lower bound reaches the target, saved in the manifest."""
    import time

    from bundle.registry import BundleError, Registry
    from routing.estimate import agreement_curve, evidence_from_records, threshold_for_target

    registry = Registry(home)
    try:
        bundle = registry.load(version)
    except BundleError as exc:
        _fail(str(exc))
    horizon = time.time() - since_s if since_s else 0.0
    records = [r for r in _open_queue(queue, home).export() if r.time >= horizon]
    evidence = evidence_from_records(records, teacher_version=bundle.teacher_version, student_version=bundle.version)
    if len(evidence) == 0:
        _fail(f"no shadow or fallback records of student {bundle.version} and teacher {bundle.teacher_version} "
              f"in the queue ({len(records)} records looked at): serve traffic with shadow.share > 0 first")
    chosen = threshold_for_target(agreement_curve(evidence), target)
    if chosen is None:
        _fail(f"no threshold reaches {target} agreement on the lower bound with {len(evidence)} records: "
              "collect more shadow traffic or lower the target")
    previous = bundle.manifest.threshold
    registry.save_manifest(bundle, bundle.manifest.model_copy(update={"threshold": chosen.threshold}))
    typer.echo(json.dumps({"version": bundle.version, "source": "queue", "records": len(evidence),
                           "previous_threshold": previous, "threshold": chosen.threshold,
                           "live_teacher_share": chosen.teacher_share,
                           "live_agreement_with_teacher": chosen.agreement.as_dict(),
                           "note": "a gateway with routing.threshold set keeps its override"}, indent=2))


@app.command()
def versions(home: Home = None) -> None:
    """List registry versions; the current one is marked."""
    from bundle.registry import Registry

    registry = Registry(_home(home))
    current = registry.current_version()
    for version in registry.versions():
        typer.echo(f"{'*' if version == current else ' '} {version}")


@app.command()
def promote(version: str, home: Home = None) -> None:
    """Make VERSION current (checksums verified first); a running gateway swaps to it."""
    from bundle.registry import BundleError, Registry

    try:
        Registry(_home(home)).promote(version)
    except BundleError as exc:
        _fail(str(exc))
    typer.echo(f"current -> {version}")


@app.command()
def rollback(home: Home = None) -> None:
    """Return `current` to the version before the last promotion."""
    from bundle.registry import BundleError, Registry

    try:
        version = Registry(_home(home)).rollback()
    except BundleError as exc:
        _fail(str(exc))
    typer.echo(f"current -> {version}")


FAST_PATH_ENV = {
    # HAProxy in front of direct-ingress replicas instead of Ray's Python proxy (docs/performance.md).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # gRPC data plane between deployments, request-path logs buffered, GC frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # A request already sent to a replica that dies (its connection closed with no answer) is sent again to
    # another replica, as a failed connection is by Ray's default; 5xx answers and timeouts are not retried.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
    "RAY_SERVE_HAPROXY_RETRIES": "2",
}
# On a 2-core machine model loading starves the proxy's first health checks; give it time.
SLOW_START_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


QueueUrl = Annotated[str | None, typer.Option("--queue", help="Queue URL: sqlite:///path.db or redis://host:port/db "
                                              "(default: $CASCADE_QUEUE_URL, else SQLite in the model home).")]
queue_app = typer.Typer(help="The distillation queue: what the gateway learned from the teacher.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


def _open_queue(url: str | None, home: Path):
    """``--queue`` if given, else the gateway's own resolution (serving.settings.queue_url)."""
    from records.queue import open_queue
    from serving.settings import queue_url

    return open_queue(url or queue_url(None, home))


@queue_app.command("stats")
def queue_stats(queue: QueueUrl = None, home: Home = None) -> None:
    """Backlog, leased records, the oldest record's age, and the live agreement (and accuracy) estimates, as JSON."""
    from routing.estimate import summary

    backend = _open_queue(queue, _home(home))
    typer.echo(json.dumps(backend.stats().model_dump() | {"estimate": summary(list(backend.export()))}, indent=2))


@queue_app.command("export")
def queue_export(queue: QueueUrl = None, home: Home = None,
                 output: Annotated[Path | None, typer.Option(help="JSONL file (default stdout).")] = None) -> None:
    """Every queued record as JSON lines (the queue keeps them)."""
    backend = _open_queue(queue, _home(home))
    handle = output.open("w") if output else sys.stdout
    count = 0
    for record in backend.export():
        handle.write(record.model_dump_json() + "\n")
        count += 1
    if output:
        handle.close()
        typer.echo(f"exported {count} records to {output}")


@queue_app.command("purge")
def queue_purge(queue: QueueUrl = None, home: Home = None,
                yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Delete every queued record (they hold user text)."""
    if not yes:
        typer.confirm("delete every queued record?", abort=True)
    typer.echo(f"purged {_open_queue(queue, _home(home)).purge()} records")


def _duration_s(text: str) -> float:
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r}: use a number and a unit, e.g. 90s, 30m, 6h, 1d")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


@app.command()
def distill(
    from_queue: Annotated[bool, typer.Option("--from-queue", help="Train on the queued teacher answers.")] = False,
    queue: QueueUrl = None,
    home: Home = None,
    every: Annotated[str | None, typer.Option(help="Run again after this long (e.g. 6h); stop with Ctrl-C.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML of re-distillation settings (`cascade distill "
                                                "--print-config` shows them all); flags override it.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs over base + queued texts.")] = None,
    promote: Annotated[bool, typer.Option(help="Promote a new student that passes the gate.")] = True,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Non-inferiority margin of the gate on the base "
                                                            "test set.")] = None,
    queue_sharpen: Annotated[float | None, typer.Option(min=1.0, help="Scale queued teacher logits by this "
                                                        "(sharper targets on the queued domain).")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved settings and exit.")
                            ] = False,
) -> None:
    """Re-distill the student from the queue, gate it against the current one, register and promote it."""
    import time

    import yaml
    from pydantic import ValidationError

    from distill.redistill import RedistillConfig, redistill

    flags = {"epochs": epochs, "max_accuracy_drop": max_accuracy_drop, "queue_sharpen": queue_sharpen}
    try:
        settings = yaml.safe_load(config.read_text()) or {} if config else {}
        cfg = RedistillConfig.model_validate(settings | {"promote": promote}
                                             | {k: v for k, v in flags.items() if v is not None})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        _fail(f"re-distillation settings: {exc}".replace("\n", " "))
    if print_config:
        typer.echo(yaml.safe_dump(cfg.model_dump(), sort_keys=False), nl=False)
        return
    if not from_queue:
        _fail("only --from-queue is supported: `cascade build` makes a bundle from the base data")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    home = _home(home)
    period = _duration_s(every) if every else None
    while True:
        result = redistill(home, _open_queue(queue, home), cfg)
        typer.echo(result.model_dump_json(indent=2))
        if period is None:
            if result.status == "rejected":
                raise typer.Exit(code=2)
            return
        time.sleep(period)


@app.command()
def serve(
    home: Home = None,
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    config: Annotated[Path | None, typer.Option(
        help="Serve config YAML (default: the built-in one, written out in deploy/serve.yaml). Its "
        "process_limits section (request timeout, client and keep-alive timeouts, header size, connections; "
        "serving/settings.py ProcessLimits) is applied at start: HAProxy's environment and http_options.")] = None,
    fast: Annotated[bool, typer.Option(
        help="HAProxy ingress + throughput-optimised Serve (default). --no-fast: Ray's Python proxy.")] = True,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all).")] = None,
    metrics_port: Annotated[int, typer.Option(help="Ray's Prometheus metrics port on this node (every replica's "
                                              "cascade_* metrics; deploy/prometheus.yml scrapes it).")] = 8080,
    address: Annotated[str | None, typer.Option(
        help="Deploy on a running Ray cluster (`ray start --head`, e.g. 127.0.0.1:6379) instead of starting one; "
        "its nodes need the fast path's RAY_SERVE_* environment themselves, process_limits' RAY_SERVE_HAPROXY_* "
        "included (or use --no-fast).")] = None,
    autoscale: Annotated[bool, typer.Option(
        help="Serve autoscaling (serving/deployment.py AUTOSCALING) instead of fixed replicas; "
             "the built-in config only.")
    ] = False,
) -> None:
    """Start a local Ray (or join one with --address) and the gateway on the current bundle; blocks until interrupted.

    The app is deployed from a Serve config, as `serve run deploy/serve.yaml` would, so a later
    `serve deploy` of a changed config reconfigures the running replicas without a restart.
    """
    from bundle.registry import BundleError, Registry

    home = _home(home)
    try:
        bundle = Registry(home).load()
    except BundleError as exc:
        _fail(f"{exc} (run `make models`)")
    serve_config = _serve_config(config, port, autoscale, fast, home, address)
    _start_ray(address, num_cpus, metrics_port)
    signalled = _stop_on_signals()
    _run_until_stopped(serve_config, bundle.version, port, fast, metrics_port, address, signalled)


def _serve_config(config: Path | None, port: int, autoscale: bool, fast: bool, home: Path,
                  address: str | None) -> dict[str, Any]:
    """The Serve config to deploy, with process_limits applied: HAProxy's environment (set here, inherited by
    the local Ray) and http_options; the home reaches replicas on a cluster started elsewhere."""
    import yaml
    from pydantic import ValidationError

    from serving.app import default_serve_config
    from serving.settings import ProcessLimits

    serve_config = yaml.safe_load(config.read_text()) if config else default_serve_config(port, autoscale=autoscale)
    serve_config.setdefault("http_options", {})["port"] = port
    try:  # HAProxy reads its limits only from the environment of the process that starts Ray: set them first
        limits = ProcessLimits.from_serve_config(serve_config)
    except (ValidationError, ValueError) as exc:
        _fail(f"{config or 'the built-in Serve config'}: process_limits: {exc}")
    serve_config["http_options"].update(limits.http_options())
    for key, value in SLOW_START_ENV.items():
        os.environ.setdefault(key, value)
    if fast:
        os.environ.update(FAST_PATH_ENV)
        os.environ.update(limits.haproxy_env())
    else:
        serve_config["http_options"]["host"] = "127.0.0.1"
    os.environ["CASCADE_HOME"] = str(home)
    if address:
        # Replicas on a cluster started elsewhere do not inherit this shell's environment: give them the home.
        for application in serve_config["applications"]:
            runtime_env = application.setdefault("runtime_env", {})
            runtime_env.setdefault("env_vars", {})["CASCADE_HOME"] = str(home)
    return serve_config


def _start_ray(address: str | None, num_cpus: int | None, metrics_port: int) -> None:
    """Join ``address``, or start a local Ray whose dashboard (127.0.0.1 only) carries Serve's REST API."""
    import ray

    from serving import _ray_compat

    _ray_compat.check_version()
    # A stop is not a crash: Ray's failure signal handler would abort this process mid-shutdown on SIGTERM.
    _ray_compat.disable_failure_signal_handler()
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _metrics_export_port=metrics_port)


def _stop_on_signals() -> list[int]:
    """SIGTERM (docker stop, kill, a test's teardown) and SIGINT (Ctrl-C) stop the same way: Serve, the local Ray
    and HAProxy, also while the models are still loading, and exit 0. Set after ray.init, which installs its own
    (exit status 15). Returns the list a signal is appended to."""
    import signal

    signalled: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if signalled:  # a second Ctrl-C while stopping: let the stop finish, or HAProxy could be left listening
            return
        signalled.append(signum)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return signalled


def _run_until_stopped(serve_config: dict[str, Any], version: str, port: int, fast: bool, metrics_port: int,
                       address: str | None, signalled: list[int]) -> None:
    """Deploy, wait for both models, announce, block; on the way out stop what this command started."""
    import ray
    from ray import serve as ray_serve
    from ray.serve.schema import ServeDeploySchema

    from serving import _ray_compat

    node_id = ray.get_runtime_context().get_node_id()
    try:
        # proxy_location is the config's, as with `serve run`: without it Serve starts a proxy on every node.
        _ray_compat.start_serve_and_deploy(ServeDeploySchema.model_validate(serve_config))
        _wait_until_running(timeout_s=900)
        _announce_and_block(version, port, fast, metrics_port)
    finally:
        # Stopped by a signal, the Ray this command started goes with everything on it (ray.shutdown stops its
        # raylet, whose workers follow; then the orphaned HAProxy): Serve's graceful shutdown first would wait
        # out its 30 s drain of the Gateway replicas. A SIGTERM to the process group kills GCS and raylet before
        # that could start; a SIGINT does not, so without this Ctrl-C took over 30 s.
        if address or (not signalled and _local_ray_alive()):
            ray_serve.shutdown()  # the controller stops the replicas and the proxies (HAProxy among them)
        ray.shutdown()
        if not address:
            _stop_haproxy(node_id)


def _local_ray_alive(grace_s: float = 1.0) -> bool:
    """Whether the local Ray's daemons survived the signal (one to our process group reaches them too).

    With the GCS gone, Serve's shutdown only waits out its 30 s timeout, longer than `docker stop` allows.
    """
    import time

    from serving import _ray_compat

    node = _ray_compat.local_node()
    deadline = time.monotonic() + grace_s  # dying daemons may take a moment to exit
    while time.monotonic() < deadline:
        if node is None or not node.remaining_processes_alive():
            return False
        time.sleep(0.1)
    return True


def _announce_and_block(version: str, port: int, fast: bool, metrics_port: int) -> None:
    """Say what listens where and who may call it, then sleep until a signal ends the process."""
    import time

    exposed = (f"0.0.0.0:{port} (HAProxy), 0.0.0.0:8404 (HAProxy stats), 0.0.0.0:9101, replica ports from 30000"
               if fast else f"127.0.0.1:{port}") + f"; metrics on :{metrics_port}/metrics"
    auth = ("API key required" if os.environ.get("CASCADE_API_KEY") or os.environ.get("CASCADE_API_KEY_FILE")
            else "no API key set (CASCADE_API_KEY): anyone who can reach these ports can call it")
    typer.echo(f"cascade: bundle {version} ready on http://127.0.0.1:{port}\n"
               f"  listening on: {exposed}\n  access: {auth}\n  Ctrl-C to stop", err=True)
    while True:
        time.sleep(3600)


def _stop_haproxy(node_id: str) -> None:
    """Stop the HAProxy that Ray Serve started on this node, if it outlived Ray.

    Ray Serve 2.60 runs HAProxy as a child of its HAProxyManager actor, in that actor's process group, and
    stops it only when the controller shuts the proxy down. A signal to `cascade serve`'s process group
    (docker stop, systemd, a terminal) also reaches Ray's GCS and raylet, which die before the controller
    can do so: the actor's worker exits and HAProxy is orphaned, still bound to 0.0.0.0 on the serving
    port, 8404 and 9101. Its command line names its config under this node's id, so exactly that one
    (and any draining predecessor) is stopped here, never an HAProxy someone else runs.
    """
    import itertools

    import psutil

    from serving import _ray_compat

    config = _ray_compat.haproxy_config_path(node_id)
    ours = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(first == "-f" and second == config for first, second in itertools.pairwise(cmdline)):
            ours.append(process)
    for process in ours:
        process.terminate()  # HAProxy's hard stop: close the listeners and exit
    _, alive = psutil.wait_procs(ours, timeout=10)
    for process in alive:
        process.kill()
    if ours:
        typer.echo(f"cascade: stopped {len(ours)} HAProxy process(es) left behind by Ray Serve", err=True)


def _wait_until_running(timeout_s: float) -> None:
    """Block until every application is RUNNING (both models loaded); fail on DEPLOY_FAILED."""
    import time

    from ray import serve as ray_serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        applications = ray_serve.status().applications
        states = {name: str(app_status.status) for name, app_status in applications.items()}
        if states and all(state.endswith("RUNNING") for state in states.values()):
            return
        failed = [name for name, state in states.items() if state.endswith("DEPLOY_FAILED")]
        if failed:
            _fail(f"deployment failed: {applications[failed[0]].message}")
        time.sleep(1)
    _fail(f"the application was not running after {timeout_s:.0f} s")


def _bundle_test_split(home: Path):
    """The current bundle's own test split (its recorded build data): load tests send the traffic it was built for."""
    from bundle.registry import BundleError, Registry
    from distill.build import splits_for
    from distill.config import BuildInputError

    try:
        manifest = Registry(home).load(verify=False).manifest
        return splits_for(BuildConfig.model_validate(manifest.build)).test
    except (BundleError, BuildInputError) as exc:
        _fail(f"cannot read the current bundle's test texts: {exc}")


@app.command()
def loadtest(
    host: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8000",
    users: Annotated[int, typer.Option(help="Concurrent Locust users.")] = 16,
    run_time: Annotated[int, typer.Option("--run-time", help="Seconds (at most 600).")] = 30,
    hard_share: Annotated[float, typer.Option(help="Share of texts the live threshold sends to the teacher.")] = 0.1,
    max_error_rate: Annotated[float, typer.Option(help="Fail above this share of failed requests.")] = 0.01,
    p99_ms: Annotated[float, typer.Option(help="Fail when the overall p99 is above this.")] = 500.0,
    out: Annotated[Path, typer.Option(help="Folder for the CSV, HTML and summary.json.")] = Path(
        "loadtests/reports/locust"),
    home: Home = None,
) -> None:
    """Headless, bounded Locust run on the bundle's own test texts; non-zero exit when an objective is missed."""
    from loadtests.locust_runner import LoadTestSettings, run

    settings = LoadTestSettings(host=host, users=users, spawn_rate=users, run_time_s=run_time, hard_share=hard_share,
                                max_error_rate=max_error_rate, p99_ms=p99_ms,
                                api_key=os.environ.get("CASCADE_API_KEY"))
    summary = run(settings, _bundle_test_split(_home(home)).texts[: settings.texts], out)
    typer.echo(summary.model_dump_json(indent=2))
    if not summary.passed:
        raise typer.Exit(code=1)


@app.command("drift-demo")
def drift_demo(home: Home = None,
               port: Annotated[int, typer.Option(help="Port of the demo's own gateway (127.0.0.1).")] = 8765,
               distill_config: Annotated[Path | None, typer.Option(help="Re-distillation settings YAML, passed "
                                                                   "to `cascade distill --config`.")] = None,
               runs: Annotated[int, typer.Option(min=1, help="Runs, each with its own seed and stream order.")] = 3,
               texts: Annotated[int | None, typer.Option(min=30, help="Use only this many Amazon texts (a smoke "
                                                         "run on a tiny bundle); default all.")] = None,
               hold_agreement: Annotated[float | None, typer.Option(min=0.5, max=0.999, help="Instead: serve with "
                                                                    "routing.target_agreement at this value, stream, "
                                                                    "and measure the thresholds the replicas chose "
                                                                    "on the held-out texts (no re-distillation).")
                                         ] = None,
               ) -> None:
    """Show the loop on the shifted domain: stream Amazon texts, re-distill from the queue, measure again.

    Starts its own gateway on a private copy of the current bundle; stop any running gateway first.
    """
    from cli.drift_demo import hold, run

    if hold_agreement is not None:
        raise typer.Exit(code=hold(_home(home), hold_agreement, port=port, runs=runs, texts=texts))
    raise typer.Exit(code=run(_home(home), port=port, distill_config=distill_config, runs=runs,
                              texts=texts))


@app.command()
def reference(write: Annotated[bool, typer.Option("--write", help="Rewrite the README's section in place.")] = False,
              readme: Annotated[Path, typer.Option(help="The README to rewrite.")] = Path("README.md")) -> None:
    """Print the configuration reference (every user_config field and environment variable) from the models."""
    from cli.reference import refresh, render

    if not write:
        typer.echo(render())
        return
    typer.echo(f"{readme}: {'updated' if refresh(readme) else 'already current'}")


@app.command("serve-config")
def serve_config_command(port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
                         autoscale: Annotated[bool, typer.Option(
                             help="With autoscaling_config in place of num_replicas.")] = False) -> None:
    """Print the built-in Serve config (the source of deploy/serve.yaml)."""
    import yaml

    from serving.app import default_serve_config

    typer.echo(yaml.safe_dump(default_serve_config(port, autoscale=autoscale), sort_keys=False), nl=False)


@app.command()
def generate(check: Annotated[bool, typer.Option("--check", help="Only report stale files (exit 1).")] = False
             ) -> None:
    """Rewrite deploy/serve.yaml and the Helm chart's values.yaml and values.schema.json from the settings models."""
    from serving import generate as generated

    raise typer.Exit(code=generated.main(["--check"] if check else []))

@app.command()
def bench(
    home: Home = None,
    url: Annotated[str, typer.Option(help="A running gateway; one is started on port 8000 if none answers.")] = (
        "http://127.0.0.1:8000"),
    seconds: Annotated[int, typer.Option(min=1, max=120, help="Seconds per load point.")] = 10,
    concurrency: Annotated[list[int] | None, typer.Option(help="Closed-loop connections (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the results as JSON here.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the side-by-side report (Markdown, JSON, PNG plots) "
                                                "here: cascade, teacher only, student only, plain server.")] = None,
    p99_ms: Annotated[float, typer.Option(help="p99 objective for the report's highest sustainable rate.")] = 100.0,
    targets: Annotated[bool, typer.Option("--targets", help="Instead: every serving objective measured in one run "
                                          "(model-only limit, closed loop 1-256, Locust 16 and 64 users, open-loop "
                                          "overload at 2x capacity, auto against teacher-only) with a verdict "
                                          "table; --output writes the raw numbers as JSON.")] = False,
    model_only: Annotated[bool, typer.Option("--model-only", help="Instead: the student alone, no HTTP and no "
                                             "server: texts/s and p50/p99 per threads x processes arrangement, "
                                             "the best, and the batch-1 p50 (--seconds per arrangement).")] = False,
) -> None:
    """Load the gateway and a plain single-process ONNX Runtime server over HTTP; print p50/p99 and req/s."""
    home = _home(home)
    split = _bundle_test_split(home)
    texts = split.texts[:500]  # the same texts the HTTP runs send, so the numbers compare
    if model_only:
        _bench_model_only(home, texts, seconds, output)
        return
    from loadtests.bench import benchmark, format_results, to_json

    with _gateway_answering(url, home):
        if targets:
            _bench_targets(url, home, texts, seconds, output)
            return
        if report is not None:
            _bench_report(url, home, split, report, seconds, concurrency or [1, 2, 4, 8, 16, 32, 64], p99_ms)
            return
        results = benchmark(url, home, texts, seconds, concurrency or [1, 32])
    typer.echo(format_results(results))
    if output:
        output.write_text(to_json(results))


def _bench_targets(url: str, home: Path, texts: list[str], seconds: int, output: Path | None) -> None:
    """``bench --targets``: the objectives table, each against numbers of the same run."""
    import httpx

    from bundle.registry import STUDENT_FILES, Registry
    from loadtests.locust_runner import LoadTestSettings, run
    from loadtests.model_only import StudentSpec
    from loadtests.targets import check_targets, format_targets, targets_json

    api_key = os.environ.get("CASCADE_API_KEY")
    served = Registry(home).load(verify=STUDENT_FILES)
    spec = StudentSpec(served.student_path, served.tokenizer_dir, served.manifest.max_length)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    deadline_s = httpx.get(f"{url}/v1/status", headers=headers, timeout=10).json()["config"]["limits"][
        "queue_deadline_s"]

    def locust(users: int) -> object:
        settings = LoadTestSettings(host=url, users=users, spawn_rate=users, run_time_s=seconds * 2, api_key=api_key)
        return run(settings, texts, Path("loadtests/reports/targets") / f"locust-{users}")

    result = check_targets(url, spec, texts, seconds, api_key, deadline_s, locust)
    typer.echo(format_targets(result))
    if output:
        output.write_text(targets_json(result))


def _bench_model_only(home: Path, texts: list[str], seconds: int, output: Path | None) -> None:
    """`bench --model-only`: the served student alone, in this process, per threads x processes arrangement."""
    from bundle.registry import STUDENT_FILES, Registry
    from loadtests.model_only import StudentSpec, format_model_only, model_only_json, run_model_only

    served = Registry(home).load(verify=STUDENT_FILES)
    spec = StudentSpec(served.student_path, served.tokenizer_dir, served.manifest.max_length)
    result = run_model_only(spec, texts, seconds)
    typer.echo(format_model_only(result))
    if output:
        output.write_text(model_only_json(result))


@contextmanager
def _gateway_answering(url: str, home: Path) -> Iterator[None]:
    """A gateway at ``url`` for the body: the one already answering, else `cascade serve` started here and
    stopped after (so a bench never leaves a server behind)."""
    import subprocess

    import httpx

    from loadtests.bench import wait_ready

    started = None
    try:
        httpx.get(f"{url}/v2/health/ready", timeout=2)
    except httpx.HTTPError:
        typer.echo("no gateway answering; starting `cascade serve`", err=True)
        started = subprocess.Popen([sys.argv[0], "serve", "--home", str(home)], start_new_session=True)
        wait_ready(url, "/v2/health/ready", 900, started)
    try:
        yield
    finally:
        if started is not None:
            started.terminate()
            started.wait(timeout=120)


def _bench_report(url: str, home: Path, split: Dataset, report: Path, seconds: int, concurrency: list[int],
                  p99_ms: float) -> None:
    """`bench --report`: cascade, teacher only, student only and the plain server side by side, on the bundle's
    first 500 test texts and labels."""
    from bundle.registry import Registry
    from loadtests.report import BundleFacts, run_report

    served = Registry(home).load(verify=False)
    facts = BundleFacts(served.version, served.manifest.threshold,
                        json.loads((served.path / "report.json").read_text()))
    typer.echo(run_report(url, home, split.texts[:500], split.labels[:500], report, seconds, concurrency, facts,
                          p99_ms))


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="cascade")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
