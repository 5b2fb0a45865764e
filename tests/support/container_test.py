"""``make container-test``: build the images, run the compose federation of them, judge it.

It builds the server and hospital images from this repository (deploy/Dockerfile, from
the wheelhouse ``make wheelhouse`` fills), creates the federation's certificates with
``fedfusion certs``, and runs deploy/compose.yaml's federation -- a server and three
hospitals, TLS, authenticated hospitals, DP-SGD and SecAgg+ -- for three rounds on this
machine's loopback. It checks what the loopback deployment test checks (the run's
status, checkpoints, each hospital's ledger and its epsilon, the MLflow run), then kills
one hospital's container while it trains the third round and checks that the round
completes with the other two; the container is then started again, as its restart
policy would after a crash, and rejoins for the final evaluation. Everything it
started is stopped and removed; the images too unless ``--keep-images``. With
``--cuda-hospital`` it also builds the CUDA hospital image (from the wheelhouse
``make wheelhouse-cuda`` fills) and runs one hospital from it, on the CPU where there is
no GPU.

The compose file is the shipped one, adapted for a machine without a bridge network:
every service on the host's network (the server on a free loopback port), the state
volumes as folders the test reads, the images as built here.

Needs a running Docker engine and ``docker compose`` or ``docker-compose``. A base image
with Python 3.11 is made with debootstrap when no registry can be reached
(``--base-image`` names another, e.g. ``python:3.11-slim-bookworm``).

Writes benchmarks/results/containers.json and prints a summary; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from server.commands.superlink import to_toml
from shared_model.config import flatten_toml
from shared_model.processes import free_port
from tests.support.tracking import read_tracked_run

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RESULTS = ROOT / "benchmarks" / "results" / "containers.json"
HOSPITALS = ["hospital-0", "hospital-1", "hospital-2"]
VICTIM = "hospital-2"
RECORDS = {"hospital-0": 160, "hospital-1": 160, VICTIM: 480}  # the victim trains longest
UID = 10001  # the images' user
PROJECT = "fedfusion-container-test"
TAG = "container-test"
WHEELHOUSE, CUDA_WHEELHOUSE = "deploy/wheelhouse", "deploy/wheelhouse-cuda"
# the lock each wheelhouse was made from (make wheelhouse, make wheelhouse-cuda)
LOCKS = {WHEELHOUSE: "requirements/lock-cpu.txt", CUDA_WHEELHOUSE: "requirements/lock-cuda.txt"}
CUDA_HOSPITAL = "hospital-1"  # with --cuda-hospital, it runs the CUDA image (on CPU here)
RUN = {
    "num-rounds": 3,
    "server.min-hospitals": 3,
    "server.wait-for-hospitals-timeout": 300.0,
    "secagg.stage-timeout": 90.0,
    "server.round-timeout": 180.0,
}


class ContainerTestError(RuntimeError):
    """A step of the container test failed; the message says which and why."""


def log(text: str) -> None:
    """One line of progress, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def sh(cmd: list[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; ContainerTestError with its output's tail when it fails."""
    done = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise ContainerTestError(f"`{' '.join(cmd[:6])} ...` exited {done.returncode}:\n{tail}")
    return done


def wait_for(
    what: str,
    test: Callable[[], bool],
    timeout: float,
    alive: Callable[[], None] = lambda: None,
    poll: float = 2.0,
) -> None:
    """Poll ``test`` until true; ContainerTestError after ``timeout`` s or when ``alive`` raises."""
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    while not test():
        if time.monotonic() > deadline:
            raise ContainerTestError(f"timed out after {timeout:.0f}s waiting for {what}")
        if time.monotonic() - checked > 5:
            alive()
            checked = time.monotonic()
        time.sleep(poll)


def compose_command() -> list[str]:
    """``docker compose`` (v2) or ``docker-compose`` (v1), whichever is installed."""
    if sh(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ContainerTestError("neither `docker compose` nor `docker-compose` is installed")


def ensure_engine() -> None:
    """A Docker engine answers, or a clear error how to get one."""
    if shutil.which("docker") is None:
        raise ContainerTestError("no `docker` command: install Docker (Debian: docker.io)")
    if sh(["docker", "info"], check=False).returncode != 0:
        raise ContainerTestError(
            "no Docker engine answers: start one (e.g. `dockerd &` as root; without a bridge "
            "network: `dockerd --bridge=none --iptables=false &`)"
        )


def ensure_base_image(name: str, work: Path) -> bool:
    """The base image exists; made with debootstrap when it does not. True if made here."""
    if sh(["docker", "image", "inspect", name], check=False).returncode == 0:
        return False
    if ":" in name and "/" not in name.split(":")[0] and not name.startswith("fedfusion-base"):
        sh(["docker", "pull", name])  # a registry image, where a registry can be reached
        return False
    if shutil.which("debootstrap") is None:
        raise ContainerTestError(
            f"base image {name} is missing and debootstrap is not installed to make it "
            "(apt-get install debootstrap), or pass --base-image python:3.11-slim-bookworm"
        )
    root = work / "rootfs"
    log(f"making the base image {name} with debootstrap (Debian bookworm, Python 3.11)")
    sh(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3.11,python3.11-venv,python3-pip,ca-certificates",
            "bookworm",
            str(root),
            "http://deb.debian.org/debian",
        ]
    )
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    sh(["docker", "import", "-", name], stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(root, ignore_errors=True)
    return True


def stage_context(work: Path, wheelhouse: str) -> Path:
    """A build context holding only what deploy/Dockerfile.dockerignore lets in.

    The legacy builder (DOCKER_BUILDKIT=0) reads only a .dockerignore at the context's
    root, not the Dockerfile's own, and would send the whole checkout (virtual
    environment, runs, keys) to the engine. The source is copied (an edit during a build
    cannot reach it); the wheels are hard-linked where possible.
    """
    context = work / f"context-{Path(wheelhouse).name}"
    shutil.rmtree(context, ignore_errors=True)
    rules = (DEPLOY / "Dockerfile.dockerignore").read_text("utf-8").splitlines()
    kept = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    skipped = [r.removeprefix("**/") for r in rules if r.startswith("**/")]
    ignore = shutil.ignore_patterns(*skipped)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system
            shutil.copy2(src, dst)

    for rel in [*(k for k in kept if not k.startswith("deploy/wheelhouse")), wheelhouse]:
        source, target = ROOT / rel, context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = link if rel == wheelhouse else shutil.copy2
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore, copy_function=copy)
        elif source.exists():
            copy(str(source), str(target))
    shutil.copy2(DEPLOY / "Dockerfile", context / "deploy" / "Dockerfile")
    return context


def build_images(base: str, work: Path, cuda: bool) -> dict[str, dict[str, Any]]:
    """Build the server and hospital images (and the CUDA hospital's); seconds and bytes."""
    if not list((DEPLOY / "wheelhouse").glob("*.whl")):
        log("no wheels in deploy/wheelhouse: the build installs from the package indexes")
    builds = [("server", "server", WHEELHOUSE), ("hospital", "hospital", WHEELHOUSE)]
    if cuda:
        if not list((ROOT / CUDA_WHEELHOUSE).glob("torch-*.whl")):
            raise ContainerTestError(
                f"no wheels in {CUDA_WHEELHOUSE}: `make wheelhouse-cuda` first"
            )
        builds.append(("hospital-cuda", "hospital", CUDA_WHEELHOUSE))
    built: dict[str, dict[str, Any]] = {}
    for image, target, wheelhouse in builds:
        tag = f"fedfusion-{image}:{TAG}"
        log(f"building {tag} (--target {target}, base {base}, {wheelhouse})")
        started = time.monotonic()
        context = stage_context(work, wheelhouse)
        args = [f"BASE_IMAGE={base}", f"WHEELHOUSE={wheelhouse}", f"LOCK={LOCKS[wheelhouse]}"]
        args = [word for arg in args for word in ("--build-arg", arg)]
        sh(
            [
                "docker",
                "build",
                "--network",
                "host",
                "-f",
                str(context / "deploy" / "Dockerfile"),
                "--target",
                target,
                *args,
                "-t",
                tag,
                str(context),
            ],
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
        size = int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", tag]).stdout.strip())
        built[image] = {"seconds": round(time.monotonic() - started, 1), "bytes": size}
        log(f"  {tag}: {size / 1e9:.2f} GB in {built[image]['seconds']:.0f}s")
        if image != "server":  # the hospital's build reused the server's build stage
            prune_build_stage()
    return built


def prune_build_stage() -> None:
    """Remove the build stage's images (vfs keeps every layer whole)."""
    sh(["docker", "image", "prune", "-f", "--filter", "label=fedfusion.stage=build"], check=False)


def torch_in(image: str) -> dict[str, Any]:
    """The torch build inside ``image``: its version, its CUDA, and whether a GPU is seen."""
    probe = (
        "import json, torch; print(json.dumps({'version': torch.__version__, "
        "'cuda': torch.version.cuda, 'gpu_available': torch.cuda.is_available()}))"
    )
    done = sh(
        ["docker", "run", "--rm", "--network", "host", "--entrypoint", "python", image, "-c", probe]
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def cuda_hospital(checked: list[str]) -> dict[str, Any]:
    """The CUDA hospital image holds torch built for CUDA, and runs where no GPU is."""
    found = torch_in(f"fedfusion-hospital-cuda:{TAG}")
    check(
        bool(found["cuda"]),
        f"the CUDA hospital image's torch {found['version']} is built for CUDA {found['cuda']}"
        f" ({'a GPU' if found['gpu_available'] else 'no GPU: CPU'} here); {CUDA_HOSPITAL} runs it",
        checked,
    )
    return {"hospital": CUDA_HOSPITAL, **found}


def toml_text(data: dict[str, Any]) -> str:
    """``data`` (tables of settings) as TOML, dotted keys within each table."""
    return "\n".join(f"[{table}]\n{to_toml(flatten_toml(body))}" for table, body in data.items())


def prepare(work: Path, port: int, cuda: bool = False) -> Path:
    """Certificates, data, TOML files and the compose file of the federation in ``work``."""
    from shared_model.datasets.export import write_manifest

    fedfusion = str(Path(sys.executable).parent / "fedfusion")
    certs = work / "certs"
    args = [fedfusion, "certs", "init", "--out", str(certs), "-s", "127.0.0.1", "-s", "localhost"]
    sh(args + [x for name in HOSPITALS for x in ("--hospital", name)])
    for i, name in enumerate(HOSPITALS):
        write_manifest(work / "data" / name, i, RECORDS[name])
    server = tomllib.loads((DEPLOY / "compose" / "server.toml").read_text("utf-8"))
    server["server"]["address"] = f"127.0.0.1:{port}"
    server["run"] = {**flatten_toml(server.get("run", {})), **RUN}
    (work / "server.toml").write_text(toml_text(server), "utf-8")
    for name in HOSPITALS:
        hospital = tomllib.loads((DEPLOY / "compose" / f"{name}.toml").read_text("utf-8"))
        hospital["connection"]["server"] = f"127.0.0.1:{port}"
        hospital["connection"]["port"] = free_port()  # one host network: a port each
        (work / f"{name}.toml").write_text(toml_text(hospital), "utf-8")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text("utf-8"))
    compose.pop("volumes", None)
    services = {}
    for service, spec in compose["services"].items():
        if "gpu" in spec.get("profiles", []):
            continue
        spec = {k: v for k, v in spec.items() if k not in {"build", "ports", "depends_on"}}
        spec["image"] = spec["image"].rsplit(":", 1)[0] + f":{TAG}"
        if cuda and service == CUDA_HOSPITAL:
            spec["image"] = f"fedfusion-hospital-cuda:{TAG}"
        spec["network_mode"] = "host"  # no bridge network here: loopback, as the e2e test
        volumes = []
        for volume in spec["volumes"]:
            source, target, *mode = volume.split(":")
            if source.startswith("./compose/"):
                source = source.removeprefix("./compose/")
                source = str(work / (f"{service}.toml" if source.endswith(".toml") else source))
            else:  # a named state volume: a folder here, so the test can read it
                source = str(work / "state" / service)
                Path(source).mkdir(parents=True, exist_ok=True)
            volumes.append(":".join([source, target, *mode]))
        spec["volumes"] = volumes
        services[service] = spec
    compose["services"] = services
    path = work / "compose.yaml"
    path.write_text(yaml.safe_dump(compose, sort_keys=False), "utf-8")
    sh(
        [
            "chown",
            "-R",
            f"{UID}:{UID}",
            str(work / "certs"),
            str(work / "data"),
            str(work / "state"),
        ]
    )
    return path


HELD_OUT = "held-out-stats"  # evaluations, charged to the held-out part of the ledger


def ledger(work: Path, name: str) -> list[dict[str, Any]]:
    """A hospital's privacy-ledger history, or [] before it is written."""
    path = work / "state" / name / "privacy_ledger.json"
    try:
        return list(json.loads(path.read_text("utf-8"))["history"])
    except (OSError, ValueError, KeyError):
        return []


def run_dirs(work: Path) -> list[Path]:
    """The server's run directories."""
    return sorted(p.parent for p in (work / "state" / "server" / "runs").glob("*/run.json"))


def rounds_done(work: Path) -> list[dict[str, Any]]:
    """The run's completed round records so far."""
    runs = run_dirs(work)
    try:
        return list(json.loads((runs[-1] / "metrics.json").read_text("utf-8"))["rounds"])
    except (IndexError, OSError, ValueError, KeyError):
        return []


def container_state(compose: list[str], service: str) -> dict[str, Any]:
    """``docker inspect``'s State of a compose service's container."""
    cid = sh([*compose, "ps", "-q", service]).stdout.strip()
    if not cid:
        return {}
    return dict(json.loads(sh(["docker", "inspect", cid]).stdout)[0]["State"])


def check(condition: bool, what: str, checked: list[str]) -> None:
    """Record a passed check; ContainerTestError naming it when it fails."""
    if not condition:
        raise ContainerTestError(f"check failed: {what}")
    checked.append(what)


def federate(compose: list[str], work: Path, checked: list[str]) -> dict[str, Any]:
    """Run the federation; kill the victim in round 3; check the outcome."""
    logs = (work / "compose.log").open("w")
    follow = None

    def alive() -> None:
        state = container_state(compose, "server")
        if state.get("Status") == "exited":
            raise ContainerTestError(
                f"the server container exited early (code {state.get('ExitCode')})"
            )

    try:
        for name in HOSPITALS:  # what each hospital's operator does once, before its first start
            entry = ["--entrypoint", "fedfusion", name, "ledger", "init"]
            sh([*compose, "run", "--rm", *entry, "--config", "/etc/fedfusion/hospital.toml"])
        log("each hospital's privacy ledger started (fedfusion ledger init)")
        sh([*compose, "up", "-d"])
        follow = subprocess.Popen([*compose, "logs", "-f", "--no-color"], stdout=logs, stderr=logs)
        log("federation up: a server and 3 hospitals on loopback, TLS, DP, SecAgg+")
        started = time.monotonic()
        wait_for("round 2 to complete", lambda: len(rounds_done(work)) >= 3, 900, alive)
        two = rounds_done(work)
        log(f"rounds 0-2 done in {time.monotonic() - started:.0f}s; {VICTIM} trains round 3")
        for r in two[1:]:
            check(
                r["failures"] == 0 and r["declined"] == 0,
                f"round {r['round']}: no failure",
                checked,
            )
            names = sorted(h["hospital"] for h in r["hospitals"] if h["status"] == "trained")
            check(names == HOSPITALS, f"round {r['round']}: all 3 hospitals trained", checked)
        out = run_dirs(work)[-1]
        check(
            (out / "checkpoints" / "round-0002.safetensors").exists(), "round-2 checkpoint", checked
        )

        def training_round_three() -> bool:
            history = ledger(work, VICTIM)
            return bool(history) and (history[-1]["round"], history[-1]["status"]) == (3, "started")

        wait_for(f"{VICTIM} to start training round 3", training_round_three, 600, alive, 0.05)
        sh([*compose, "kill", VICTIM])
        killed_at = time.monotonic()
        log(f"killed the {VICTIM} container mid-training (round 3)")
        wait_for("round 3 to complete without it", lambda: len(rounds_done(work)) >= 4, 900, alive)
        log(f"round 3 completed without {VICTIM}; starting its container again")
        # A crashed container is restarted by its restart policy (on-failure); one stopped
        # with `docker kill` counts as stopped by hand, so start it as the policy would.
        # It rejoins for the final model's evaluation, which SecAgg+ runs with all three.
        sh([*compose, "start", VICTIM])
        wait_for(
            "the server to finish",
            lambda: container_state(compose, "server").get("Status") == "exited",
            900,
        )
        after_kill = time.monotonic() - killed_at
        code = container_state(compose, "server").get("ExitCode")
        check(code == 0, f"the server container exited 0 (got {code})", checked)
        return {
            "rounds_0_2_seconds": round(time.monotonic() - started - after_kill, 1),
            "kill_to_server_exit_seconds": round(after_kill, 1),  # round 3 + final evaluation
        }
    finally:
        if follow is not None:
            follow.terminate()
        logs.close()


def judge(work: Path, checked: list[str]) -> dict[str, Any]:
    """The run directory, the ledgers and the MLflow run after the federation."""
    (out,) = run_dirs(work)
    info = json.loads((out / "run.json").read_text("utf-8"))
    check(info["status"] == "completed", f"run status completed (got {info['status']})", checked)
    rounds = json.loads((out / "metrics.json").read_text("utf-8"))["rounds"]
    check([r["round"] for r in rounds] == [0, 1, 2, 3], "rounds 0-3 recorded, each once", checked)
    last = rounds[-1]
    trained = sorted(h["hospital"] for h in last["hospitals"] if h["status"] == "trained")
    check(trained == ["hospital-0", "hospital-1"], "round 3 completed with the other two", checked)
    check(last["failures"] >= 1, f"round 3 recorded {VICTIM}'s failure", checked)
    for n in range(1, 4):
        path = out / "checkpoints" / f"round-{n:04d}.safetensors"
        check(path.exists(), f"checkpoint of round {n}", checked)
    check((out / "global_model.safetensors").exists(), "the final model", checked)
    epsilons = {}
    for name in HOSPITALS:
        history = ledger(work, name)
        entries = [(e["mechanism"], e["round"]) for e in history if e["mechanism"] != HELD_OUT]
        rounds_in_full = [e["round"] for e in history if e["mechanism"] == "dp-sgd"]
        expected = [1, 2, 3]
        check(rounds_in_full == expected, f"{name}'s ledger counts rounds {expected}", checked)
        check(entries[0] == ("record-count", 1), f"{name}'s ledger opens with its count", checked)
        state = json.loads((work / "state" / name / "privacy_ledger.json").read_text("utf-8"))
        epsilons[name] = state["epsilon"]
        check(0 < state["epsilon"] <= 8.0, f"{name}: 0 < epsilon <= its max 8", checked)
        reported = [
            h["epsilon"]
            for r in rounds
            for h in r["hospitals"]
            if h["hospital"] == name and h["epsilon"] is not None
        ]
        if name != VICTIM:
            check(
                abs(reported[-1] - state["epsilon"]) < 1e-9,
                f"{name}: the epsilon it reported is its ledger's",
                checked,
            )
        else:
            check(
                state["epsilon"] > reported[-1],
                f"{VICTIM}: the killed round is counted in its ledger ({state['epsilon']:.2f} "
                f"> {reported[-1]:.2f} reported after round 2)",
                checked,
            )
    store = work / "state" / "server" / "runs" / "mlflow.db"  # the container's, seen here
    tracked = read_tracked_run(out, uri=f"sqlite:///{store}")
    steps = [step for step, _ in tracked.history["eval/auroc"]]
    check(tracked.status == "FINISHED" and steps == [0, 1, 2, 3], "the MLflow run", checked)
    return {
        "rounds": [
            {"round": r["round"], "seconds": r["seconds"], "macro_auroc": r["eval_auroc"]}
            for r in rounds
        ],
        "epsilon": epsilons,
    }


def dangling() -> set[str]:
    """The engine's untagged images."""
    return set(sh(["docker", "images", "-q", "-f", "dangling=true"], check=False).stdout.split())


def cleanup(
    compose: list[str], work: Path, keep_images: bool, made_base: str, before: set[str]
) -> None:
    """Stop and remove the containers, the build's leftovers, and (unless kept) the images.

    Leftovers are the untagged images that were not there ``before``: the legacy builder
    also builds every stage ahead of the target (the CUDA build's server stage).
    """
    sh([*compose, "down", "--remove-orphans", "--timeout", "5"], check=False)
    prune_build_stage()
    if not keep_images:
        for target in ("server", "hospital", "hospital-cuda"):
            sh(["docker", "image", "rm", "-f", f"fedfusion-{target}:{TAG}"], check=False)
        if made_base:
            sh(["docker", "image", "rm", "-f", made_base], check=False)
    for image in sorted(dangling() - before):
        sh(["docker", "image", "rm", "-f", image], check=False)
    sh(["rm", "-rf", str(work)], check=False)


def main(argv: list[str] | None = None) -> int:
    """Build, run, judge, clean up; print the summary. Exit status 1 on a failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-image", default="fedfusion-base:bookworm")
    parser.add_argument("--keep-images", action="store_true", help="Keep the images built.")
    parser.add_argument("--skip-build", action="store_true", help="Use images built before.")
    parser.add_argument(
        "--cuda-hospital",
        action="store_true",
        help=f"Also build the CUDA hospital image ({CUDA_WHEELHOUSE}) and run {CUDA_HOSPITAL} "
        "from it (on CPU where there is no GPU).",
    )
    args = parser.parse_args(argv)
    # Creating a container copies its whole image on some storage drivers (vfs): minutes.
    os.environ.setdefault("COMPOSE_HTTP_TIMEOUT", "900")
    os.environ.setdefault("DOCKER_CLIENT_TIMEOUT", "900")
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "base_image": args.base_image}
    checked: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="fedfusion-containers-"))
    compose: list[str] = []
    made_base = ""
    before: set[str] = set()
    try:
        ensure_engine()
        before = dangling()
        compose = [*compose_command(), "-p", PROJECT, "-f", str(work / "compose.yaml")]
        if ensure_base_image(args.base_image, work):
            made_base = "" if args.keep_images else args.base_image
        if not args.skip_build:
            summary["images"] = build_images(args.base_image, work, args.cuda_hospital)
        if args.cuda_hospital:
            summary["cuda_hospital"] = cuda_hospital(checked)
        prepare(work, free_port(), args.cuda_hospital)
        summary["federation"] = federate(compose, work, checked)
        summary.update(judge(work, checked))
        summary["ok"] = True
    except ContainerTestError as err:
        summary["ok"], summary["error"] = False, str(err)
        log(f"FAILED: {err}")
        for tail in (work / "compose.log",):
            if tail.exists():
                print("".join(tail.read_text("utf-8", "replace").splitlines(True)[-60:]))
    finally:
        summary["checked"] = checked
        if compose:
            cleanup(compose, work, args.keep_images, made_base, before)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    print_summary(summary)
    return 0 if summary["ok"] else 1


def print_summary(summary: dict[str, Any]) -> None:
    """The images, the rounds and what was checked, as a small table."""
    print()
    for target, image in summary.get("images", {}).items():
        print(
            f"image {target:9s} {image['bytes'] / 1e9:6.2f} GB   built in {image['seconds']:.0f}s"
        )
    for r in summary.get("rounds", []):
        auroc = "-" if r["macro_auroc"] is None else f"{r['macro_auroc']:.3f}"
        print(f"round {r['round']}   {r['seconds']:6.1f}s   macro AUROC {auroc}")
    for what in summary["checked"]:
        print(f"  ok  {what}")
    print(
        f"\n{'PASSED' if summary['ok'] else 'FAILED'}: {len(summary['checked'])} checks; "
        f"{RESULTS.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    sys.exit(main())
