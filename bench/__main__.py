"""Run every benchmark, then write the results page (``docs/results.md`` and ``docs/results.json``).

    python -m bench [--quick] [--resume] [--only NAME ...] [--skip NAME ...] [--page-only] [--results DIR] [--docs DIR]

Each benchmark runs in its own process (``python -m bench.NAME [--quick] --out DIR``), its output
streamed, in a fixed order, fastest first; one that fails is reported and the others still run;
the exit status is non-zero if any failed.  ``--resume`` is passed on to the benchmarks that offer
it (``bench.accuracy``, ``bench.taylor``: runs logged by an interrupted run are kept), so a full run of several hours
can be stopped and continued.  ``--page-only`` runs nothing and rebuilds the page from the JSON
already in ``--results``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.results_page import DOCS, RESULTS, ROOT, write_page


@dataclass(frozen=True)
class Benchmark:
    """A benchmark module and its arguments for a quick and a full run."""

    name: str
    quick_args: tuple[str, ...] = ("--quick",)
    full_args: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()  # run once per task (``--task T``) when the module's --help lists the option
    quick_tasks: tuple[str, ...] | None = None  # the tasks of a quick run; None: the same as ``tasks``
    package: str = "bench"

    @property
    def module(self) -> str:
        return f"{self.package}.{self.name}"


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("sizes", quick_args=()),  # one size only: about a minute
    Benchmark("tvm_kernels"),
    Benchmark("onnx_latency"),
    Benchmark("end_to_end"),
    Benchmark("taylor"),
    # sentences only in the full run: its quick run alone takes over an hour on 2 cores
    # two 1-thread workers: independent runs scale better on 2 cores than 2 threads in one run
    Benchmark("accuracy", quick_args=("--quick", "--skip-large-sparse"), full_args=("--jobs", "2", "--threads", "1"),
              tasks=("digits", "sentences"), quick_tasks=("digits",)),
)


@dataclass(frozen=True)
class Job:
    """One process to run."""

    name: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    job: Job
    returncode: int
    seconds: float


def help_text(module: str) -> str:
    """What ``python -m module --help`` prints (options are checked at run time)."""
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout


def make_jobs(benchmarks: tuple[Benchmark, ...], quick: bool, results: Path, resume: bool = False) -> list[Job]:
    jobs = []
    for benchmark in benchmarks:
        args = (benchmark.quick_args if quick else benchmark.full_args) + ("--out", str(results))
        offered = help_text(benchmark.module) if benchmark.tasks or resume else ""
        if resume and "--resume" in offered:
            args += ("--resume",)
        chosen = benchmark.tasks if not quick or benchmark.quick_tasks is None else benchmark.quick_tasks
        tasks = chosen if chosen and "--task" in offered else (None,)
        for task in tasks:
            extra = ("--task", task) if task else ()
            jobs.append(Job(f"{benchmark.name} {task}" if task else benchmark.name,
                            (sys.executable, "-m", benchmark.module, *args, *extra)))
    return jobs


def clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def run_jobs(jobs: list[Job], cwd: Path = ROOT) -> list[Outcome]:
    """Run ``jobs`` one after the other, output streamed; a failure is reported and the next job runs."""
    started, outcomes = time.perf_counter(), []
    for number, job in enumerate(jobs, 1):
        print(f"\n=== [{number}/{len(jobs)}] {job.name}: python -m {' '.join(job.command[2:])} "
              f"(elapsed {clock(time.perf_counter() - started)})", flush=True)
        begun = time.perf_counter()
        returncode = subprocess.run(job.command, cwd=cwd, check=False).returncode
        outcomes.append(Outcome(job, returncode, time.perf_counter() - begun))
        status = "ok" if returncode == 0 else f"FAILED (exit status {returncode})"
        print(f"=== [{number}/{len(jobs)}] {job.name}: {status} in {clock(outcomes[-1].seconds)} "
              f"(elapsed {clock(time.perf_counter() - started)})", flush=True)
    return outcomes


def report(outcomes: list[Outcome]) -> list[Outcome]:
    """Print one line per job; return the failed ones."""
    print("\nbenchmark            status  time")
    for o in outcomes:
        print(f"{o.job.name:<20} {'ok' if o.returncode == 0 else 'FAILED':<7} {clock(o.seconds)}")
    failed = [o for o in outcomes if o.returncode != 0]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} failed: {', '.join(o.job.name for o in failed)}")
    return failed


def parse_args(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="quick runs (minutes each) and the quick page")
    parser.add_argument("--resume", action="store_true",
                        help="pass --resume to the benchmarks that offer it: keep what an interrupted run measured")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"run only these: {', '.join(names)}")
    parser.add_argument("--skip", nargs="+", choices=names, default=[], metavar="NAME", help="do not run these")
    parser.add_argument("--page-only", action="store_true", help="run nothing; rebuild the page from --results")
    parser.add_argument("--results", type=Path, default=RESULTS, help="benchmark JSON, markdown and plots")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where results.md and results.json go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, benchmarks: tuple[Benchmark, ...] = BENCHMARKS) -> int:
    args = parse_args(argv, [b.name for b in benchmarks])
    failed = []
    if not args.page_only:
        chosen = tuple(b for b in benchmarks if b.name in (args.only or [b.name]) and b.name not in args.skip)
        failed = report(run_jobs(make_jobs(chosen, args.quick, args.results.resolve(), args.resume)))
    markdown, data = write_page(args.results, args.docs, args.quick)
    print(f"wrote {markdown} and {data}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
