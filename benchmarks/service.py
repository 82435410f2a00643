"""The service against the same sweeps run one after another with ``automl run``.

    python benchmarks/service.py [--sweeps 20] [--digits-trials 20] [--cli-runs 20] [--json PATH]

One real ``automl serve`` process (a free port on 127.0.0.1, local Ray, MLflow on SQLite, a token made with
``automl.service.store``) in a new temporary folder, ``benchmarks/objectives.py`` in its ``--trainers-dir``,
``--max-running`` as many as the sweeps submitted at once. Before anything is measured one small sweep of each
trainer warms it up (its workers import the trainers, torch and the digits data once, as a service that has run
anything has). Then, on the warm service:

1. **latency**: ``--sweeps`` small sweeps (``objectives:stamped``, 2 random trials, 2 at a time), each submitted
   when the one before has finished: from just before ``POST /api/v1/sweeps`` to the first trial's start, as the
   trial itself stamps it (``time.time()`` when the trainer is entered; one clock for every process here). p50
   and p99 of the ``--sweeps`` figures.
2. **digits**: the digits sweep of ``overhead.py`` (``objectives:digits_mlp``, ``--digits-trials`` TPE trials,
   2 at a time): end-to-end efficiency = (sum of in-trial compute / 2) / (FINISHED - submit), with FINISHED the
   service's own ``finished`` time of the sweep (its finishing step, plots and best model in MLflow, included).
   Steady-state: the same compute over the span from the first trial's start to the last one's end.
3. **throughput**: ``--sweeps`` small sweeps (``objectives:stamped``, 20 random trials of 0.2 s each, 2 at a
   time) submitted at once: trials per second from the first submit to the last trial's end; and fairness, from
   the trials' own spans: the window in which every sweep was running (from the last sweep's first trial start to
   the first sweep's last trial end); each sweep's slot-seconds in it; Jain's index of those (1.0: equal
   shares) and the smallest and largest share relative to an equal one.

Beside them, ``--cli-runs`` times the same small sweep (throughput's: 20 trials of 0.2 s) with ``automl run`` in a
fresh process, one after another, each in a new folder: the first trial's start after the command started
(latency), and trials per second over all of them; and the digits sweep with ``automl run`` once: its efficiency
over the process's whole life. Figures come from the trials' own stamps, read back from MLflow.

Targets (DESIGN.md, the service issue), on 2 cores: first trial within 0.3 s of submit (p50); warm digits
efficiency at least 0.85.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
AUTOML = str(Path(sys.executable).with_name("automl"))
CONCURRENCY = 2
LATENCY_BUDGET_S = 0.3
EFFICIENCY_BUDGET = 0.85
SMALL_TRIALS, SMALL_SLEEP = 20, 0.2
FINAL = ("FINISHED", "FAILED", "CANCELLED")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stamped_spec(name: str, trials: int, sleep: float, seed: int) -> dict[str, Any]:
    return {"name": name, "trainer": "objectives:stamped", "metric": {"name": "loss", "goal": "minimize"},
            "method": "random", "seed": seed, "budget": {"trials": trials, "max_concurrent": CONCURRENCY},
            "fixed": {"sleep": sleep}, "parameters": {"x": {"type": "float", "low": -10.0, "high": 10.0}}}


def digits_spec(trials: int) -> dict[str, Any]:
    from objectives import DIGITS_SPACE, SEED

    return {"name": "digits", "trainer": "objectives:digits_mlp", "data": {"source": "sklearn:digits"},
            "metric": {"name": "val_accuracy", "goal": "maximize"}, "method": "tpe", "seed": SEED,
            "budget": {"trials": trials, "max_concurrent": CONCURRENCY}, "parameters": DIGITS_SPACE}


class Service:
    def __init__(self, home: Path, max_running: int) -> None:
        from automl.service.store import ServiceStore

        self.home = home
        (home / "code").mkdir()
        shutil.copy(HERE / "objectives.py", home / "code" / "objectives.py")
        store = ServiceStore(f"sqlite:///{home / '.automl' / 'service.db'}")
        self.token = store.create_token("bench", "user")
        store.close()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AUTOML_STORAGE")}
        self.log = (home / "service.log").open("ab")
        self.proc = subprocess.Popen([AUTOML, "serve", "--port", str(port), "--trainers-dir", str(home / "code"),
                                      "--max-running", str(max_running)], cwd=home, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"automl serve exited: {(home / 'service.log').read_text()[-2000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{self.url}/api/v1/healthz", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("automl serve did not come up in 180 s")
            time.sleep(0.2)

    def submit(self, spec: dict[str, Any]) -> str:
        answer = self.http.post(f"{self.url}/api/v1/sweeps", json={"spec": spec}, timeout=60)
        answer.raise_for_status()
        return str(answer.json()["id"])

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        answer = self.http.get(f"{self.url}/api/v1/sweeps/{sweep_id}", timeout=60)
        answer.raise_for_status()
        return dict(answer.json())

    def wait(self, sweep_id: str, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            sweep = self.sweep(sweep_id)
            if sweep["state"] in FINAL:
                if sweep["state"] != "FINISHED":
                    raise RuntimeError(f"{sweep_id} ended {sweep['state']}: {sweep.get('error')}")
                return sweep
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sweep_id} still {sweep['state']} after {timeout:.0f} s")
            time.sleep(0.05)

    def trials(self, sweep_id: str) -> list[dict[str, Any]]:
        answer = self.http.get(f"{self.url}/api/v1/sweeps/{sweep_id}/trials", timeout=60)
        answer.raise_for_status()
        return list(answer.json()["trials"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


def spans(trials: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return sorted((float(t["metrics"]["t_start"]), float(t["metrics"]["t_end"])) for t in trials
                  if t["state"] == "COMPLETE")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return float(statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1])


def fairness(per_sweep: list[list[tuple[float, float]]]) -> dict[str, float]:
    """Slot-seconds of each sweep in the window where all of them were running; Jain's index over them."""
    start = max(s[0][0] for s in per_sweep)
    end = min(max(e for _, e in s) for s in per_sweep)
    if end <= start:
        return {"window_s": 0.0, "jain": float("nan"), "min_share": float("nan"), "max_share": float("nan")}
    used = [sum(max(0.0, min(e, end) - max(b, start)) for b, e in s) for s in per_sweep]
    total = sum(used)
    n = len(used)
    jain = total * total / (n * sum(u * u for u in used)) if total else float("nan")
    return {"window_s": end - start, "jain": jain, "min_share": min(used) * n / total,
            "max_share": max(used) * n / total}


def run_on_service(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    service = Service(home, max_running=max(args.sweeps, 2))
    try:
        print("service up; warming it up", file=sys.stderr, flush=True)
        service.wait(service.submit(stamped_spec("warm-up", 2, 0.0, 0)))
        service.wait(service.submit({**digits_spec(2), "name": "warm-up-digits"}))

        latencies, answered = [], []
        for i in range(args.sweeps):
            submitted = time.time()
            sweep_id = service.submit(stamped_spec(f"latency-{i}", 2, 0.0, i))
            answered.append(time.time() - submitted)  # the POST's own answer (201 with the QUEUED sweep)
            service.wait(sweep_id)
            latencies.append(spans(service.trials(sweep_id))[0][0] - submitted)
        out["latency_s"] = latencies
        out["post_s"] = answered
        print(f"latency p50 {percentile(latencies, 50):.3f} s", file=sys.stderr, flush=True)

        submitted = time.time()
        sweep_id = service.submit(digits_spec(args.digits_trials))
        done = service.wait(sweep_id)
        finished = datetime.fromisoformat(done["finished"].replace("Z", "+00:00")).timestamp()
        trials = service.trials(sweep_id)
        compute = sum(float(t["metrics"]["compute_s"]) for t in trials)
        digit_spans = spans(trials)
        out["digits"] = {
            "trials": len(trials), "wall_s": finished - submitted, "compute_s": compute,
            "efficiency": compute / CONCURRENCY / (finished - submitted),
            "steady_efficiency": compute / CONCURRENCY / (digit_spans[-1][1] - digit_spans[0][0]),
            "first_trial_s": digit_spans[0][0] - submitted, "after_last_trial_s": finished - digit_spans[-1][1],
            "best": done["best"]["value"] if done.get("best") else None,
        }
        print(f"digits efficiency {out['digits']['efficiency']:.2f}", file=sys.stderr, flush=True)

        submitted = time.time()
        ids = [service.submit(stamped_spec(f"burst-{i}", SMALL_TRIALS, SMALL_SLEEP, i)) for i in range(args.sweeps)]
        submit_s = time.time() - submitted
        for sweep_id in ids:
            service.wait(sweep_id)
        all_done = time.time()
        per_sweep = [spans(service.trials(sweep_id)) for sweep_id in ids]
        last_end = max(e for s in per_sweep for _, e in s)
        count = sum(len(s) for s in per_sweep)
        busy = sum(e - b for s in per_sweep for b, e in s)
        out["throughput"] = {
            "sweeps": len(ids), "trials": count, "submit_all_s": submit_s, "span_s": last_end - submitted,
            "trials_per_s": count / (last_end - submitted), "until_all_finished_s": all_done - submitted,
            "slot_use": busy / CONCURRENCY / (last_end - submitted), **fairness(per_sweep),
        }
        print(f"throughput {out['throughput']['trials_per_s']:.2f} trials/s", file=sys.stderr, flush=True)
    finally:
        service.stop()
    return out


def cli_sweep(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """``automl run spec.yaml`` in a new folder; the trials' stamps from its MLflow store."""
    import yaml
    from mlflow import MlflowClient

    shutil.copy(HERE / "objectives.py", folder / "objectives.py")
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AUTOML_STATE_DIR", "AUTOML_STORAGE")}
    started = time.time()
    proc = subprocess.run([AUTOML, "run", "spec.yaml"], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"automl run exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`automl.trial` != ''", max_results=10000)
    trials = [{"state": "COMPLETE", "metrics": r.data.metrics} for r in runs if "t_start" in r.data.metrics]
    return {"started": started, "ended": ended, "trials": trials}


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    from overhead import _temp_dir

    out: dict[str, Any] = {"latency_s": [], "walls_s": [], "trials": 0}
    for i in range(args.cli_runs):
        with _temp_dir("service-bench-cli-") as folder:
            run = cli_sweep(folder, stamped_spec(f"burst-{i}", SMALL_TRIALS, SMALL_SLEEP, i))
        out["latency_s"].append(spans(run["trials"])[0][0] - run["started"])
        out["walls_s"].append(run["ended"] - run["started"])
        out["trials"] += len(run["trials"])
        print(f"  automl run #{i + 1}: first trial at {out['latency_s'][-1]:.2f} s, exit at "
              f"{out['walls_s'][-1]:.1f} s", file=sys.stderr, flush=True)
    if args.cli_runs:
        out["trials_per_s"] = out["trials"] / sum(out["walls_s"])
    with _temp_dir("service-bench-cli-") as folder:
        run = cli_sweep(folder, digits_spec(args.digits_trials))
    compute = sum(float(t["metrics"]["compute_s"]) for t in run["trials"])
    digit_spans = spans(run["trials"])
    out["digits"] = {"trials": len(run["trials"]), "wall_s": run["ended"] - run["started"], "compute_s": compute,
                     "efficiency": compute / CONCURRENCY / (run["ended"] - run["started"]),
                     "steady_efficiency": compute / CONCURRENCY / (digit_spans[-1][1] - digit_spans[0][0]),
                     "first_trial_s": digit_spans[0][0] - run["started"]}
    print(f"  automl run digits: efficiency {out['digits']['efficiency']:.2f}", file=sys.stderr, flush=True)
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def report(service: dict[str, Any], cli: dict[str, Any], args: argparse.Namespace) -> str:
    lat, d, t = service["latency_s"], service["digits"], service["throughput"]
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    cli_lat = cli["latency_s"]
    cli_cells = (f"{percentile(cli_lat, 50):.2f} / {percentile(cli_lat, 99):.2f}" if cli_lat else "-")
    cd = cli["digits"]
    cli_use = cli["trials"] * SMALL_SLEEP / CONCURRENCY / sum(cli["walls_s"]) if cli["walls_s"] else float("nan")
    rows = [
        "| | warm service | `automl run`, one after another |",
        "|---|---|---|",
        f"| submit to first trial, p50 / p99 (s) | {p50:.3f} / {p99:.3f} ({len(lat)} sweeps) | {cli_cells} "
        f"({len(cli_lat)} runs) |",
        f"| the submit's own answer (POST, 201), p50 (s) | {percentile(service['post_s'], 50):.3f} | - |",
        f"| digits ({d['trials']} trials): end-to-end efficiency | {d['efficiency']:.2f} | {cd['efficiency']:.2f} |",
        f"| digits: steady-state efficiency | {d['steady_efficiency']:.2f} | {cd['steady_efficiency']:.2f} |",
        f"| digits: first trial after submit / after its last trial until FINISHED (s) | {d['first_trial_s']:.2f} / "
        f"{d['after_last_trial_s']:.2f} | {cd['first_trial_s']:.2f} / - |",
        f"| {t['sweeps']} small sweeps ({SMALL_TRIALS} trials of {SMALL_SLEEP} s): trials per second | "
        f"{t['trials_per_s']:.2f} (all submitted at once) | "
        f"{cli.get('trials_per_s', float('nan')):.2f} |",
        f"| slot use while they ran (ideal 1.0) | {t['slot_use']:.2f} | {cli_use:.2f} |",
        f"| fairness: Jain's index of slot-seconds while all {t['sweeps']} ran (window {t['window_s']:.1f} s); "
        f"smallest / largest share of an equal one | {t['jain']:.3f}; {t['min_share']:.2f} / {t['max_share']:.2f} "
        "| - |",
    ]
    verdicts = (f"Targets: first trial within {LATENCY_BUDGET_S} s of submit, p50: {p50:.3f} s, "
                f"{_verdict(p50 <= LATENCY_BUDGET_S)}; warm digits efficiency at least {EFFICIENCY_BUDGET}: "
                f"{d['efficiency']:.2f}, {_verdict(d['efficiency'] >= EFFICIENCY_BUDGET)}.")
    return "\n".join(rows) + "\n\n" + verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=20, help="latency sweeps, and sweeps submitted at once")
    parser.add_argument("--digits-trials", type=int, default=20)
    parser.add_argument("--cli-runs", type=int, default=20,
                        help="`automl run` processes of the small sweep, one after another (0 skips them)")
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    if args.sweeps < 2 or args.digits_trials < 2 or args.cli_runs < 0:
        parser.error("--sweeps and --digits-trials must be at least 2, --cli-runs at least 0")
    from overhead import _temp_dir, machine, versions

    with _temp_dir("service-bench-") as home:
        service = run_on_service(args, home)
    cli = run_cli(args)
    text = report(service, cli, args)
    print(f"{machine()}; {json.dumps(versions())}\n")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"service": service, "cli": cli, "machine": machine(),
                                         "versions": versions()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
