"""``compress search``: an Optuna multi-objective search over a recipe's own compression choices.

The recipe's ``search:`` section names stage fields by their ``--set`` paths (or with the
stage's type or label in place of ``stages.N``) and lists values for each; nothing here knows a
stage type, so a stage added to the registry is searchable as soon as it exists. A trial is a
normal run of the recipe with the trial's values applied as overrides, in its own run directory
(``trials/NNNN/short`` and ``trials/NNNN/full``), sharing one stage cache (``cache/``) so that
the stages before the first searched stage run once (``base/``, ``base-short/``) and every
identical stage of two trials runs once.

Budget (successive halving, Li et al. 2018 "A System for Massively Parallel Hyperparameter
Tuning", ASHA): every trial first runs a *short rung*: its training stages after the first
searched stage train for ``budget.short_fraction`` of their steps, every evaluation scores
``budget.short_eval_limit`` examples (PyTorch, no export, no latency). The short rung's score
goes to :class:`optuna.pruners.SuccessiveHalvingPruner` (``min_resource=1``,
``reduction_factor=η``); only trials it promotes (about the best 1 in η so far) get the full
run. Optuna does not prune multi-objective studies (``Trial.report`` refuses them), so the rung
lives in a companion single-objective study ``<name>.rungs`` in the same storage, one rung trial
per trial. ASHA rather than Hyperband or a median rule because it is asynchronous (workers
never wait for a rung to fill, which several machines on one study need), needs no total number
of trials in advance, and two rungs are exactly its case. The short score is gate-aware, to be
minimised: a trial whose short evaluation misses the gate's metric rules scores its normalised
shortfall (> 0), plus a large constant when it misses a rule on a characteristic (parameters,
GFLOPs: no healing changes those); one that passes scores ``cost / baseline cost - 1`` (≤ 0), so
passing trials beat failing ones and smaller ones beat larger ones — promoting on quality alone
would prune exactly the aggressive cuts the search is for.

Storage: an Optuna RDB URL, by default ``sqlite:///<out>/study.db``. Local workers take a file
lock around "count the trials, ask for one", so they never exceed ``--trials`` nor draw a grid
point twice; a trial records its host and pid, and a worker that finds a RUNNING trial of its
host whose process is gone marks it FAIL and enqueues its values again: the retry resumes the
same trial folder (complete stages are reused), so a killed search loses and repeats nothing.

Results: ``trials.csv``, ``pareto.json``, ``pareto.png``, ``report.md``, and the smallest trial
that passes the gate finished as a normal run (push and plots included) in ``best/``, linked as
``result``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import CompressError, GateFailed, RecipeError, UserInputError
from compressor.fileio import atomic_write_json, atomic_write_text
from compressor.recipe.loader import LoadedRecipe, _compose, apply_override, validate_data

log = logging.getLogger(__name__)

LOWER_BOUND_RULES = ("min", "min_recovery")  # the observed value must be at least the threshold
PRIMITIVE = (int, float, str, bool, type(None))
MAX_REDRAWS = 50  # repeated draws in a row before a worker stops (a sampler stuck on taken points)


def _point(params: dict) -> tuple:
    return tuple(sorted(params.items()))


@dataclass
class Dimension:
    """One searched key: the stage it addresses, the ``--set`` path, the values and their Optuna choices."""

    key: str
    index: int
    path: str
    values: list[Any]
    choices: list[Any] = field(default_factory=list)

    def __post_init__(self):
        self.choices = [v if isinstance(v, PRIMITIVE) else json.dumps(v, sort_keys=True) for v in self.values]

    def value(self, choice: Any) -> Any:
        return self.values[self.choices.index(choice)]

    def override(self, value: Any) -> str:
        return f"{self.path}={json.dumps(value)}"


@dataclass
class SearchPlan:
    """A validated search: the recipe, its space, objectives and directions, and the labels it reads."""

    loaded: LoadedRecipe
    dims: list[Dimension]
    objectives: list[str]
    directions: list[str]
    candidate: str
    baseline: str | None
    trials: int
    first: int

    @property
    def spec(self):
        return self.loaded.recipe.search

    def fingerprint(self) -> dict:
        """What a stored study must have been made with to be resumed."""
        return {"space": {d.key: d.choices for d in self.dims}, "objectives": self.objectives}


# --------------------------------------------------------------------------------------------
# Validation (exit 2 before any trial)
# --------------------------------------------------------------------------------------------


def _load(loaded: LoadedRecipe, overrides: list[str], drop: tuple[int, ...] = (), keep: int | None = None,
          edit=None) -> LoadedRecipe:
    """The recipe re-read from its file with the ``--set`` overrides, then ``overrides`` (the same
    mechanism as ``--set``), then stages dropped/truncated; validated like any recipe."""
    src = loaded.source
    data, lines, _ = _compose(src.read_text(encoding="utf-8"), str(src))
    all_lines: dict = dict(lines)
    ovs = [*loaded.overrides, *overrides]
    for ov in ovs:
        set_path = apply_override(data, ov)
        for p in list(all_lines):
            if p[: len(set_path)] == set_path:
                del all_lines[p]
        all_lines[set_path] = f"--set {ov}" if ov in loaded.overrides else f"search {ov}"
    if keep is not None or drop:
        stages = data["stages"][:keep] if keep is not None else data["stages"]
        data["stages"] = [st for i, st in enumerate(stages) if i not in drop]
    if edit is not None:
        edit(data)
    recipe = validate_data(data, str(src), all_lines)
    return LoadedRecipe(recipe=recipe, source=src, lines=all_lines, overrides=ovs)


def make_plan(loaded: LoadedRecipe, trials: int | None = None) -> SearchPlan:
    """Check a recipe's ``search:`` section against the recipe; every problem exits 2 with its line.

    Raises:
        RecipeError: no ``search:`` section, a key naming no stage or field, a value the stage's
            schema refuses, objectives the candidate evaluation cannot give.
    """
    from compressor.recipe.loader import _line
    from compressor.recipe.schema import search_key_stage
    from compressor.stages import declaration
    from eval.metrics import higher_is_better

    recipe = loaded.recipe
    src = str(loaded.source)

    def where(path: tuple) -> str:
        ln = _line(path, loaded.lines)
        return f"{ln}: " if isinstance(ln, str) else (f"{src}:{ln}: " if ln is not None else f"{src}: ")

    if recipe.search is None:
        raise RecipeError([f"{src}: no `search:` section; add one, e.g. search: {{space: "
                           "{remove_layers.language_model.drop_top: [0, 2, 4]}}}"])
    spec = recipe.search
    problems: list[str] = []
    dims: list[Dimension] = []
    for key, values in spec.space.items():
        loc = ("search", "space", key)
        target = search_key_stage(recipe, key)
        if isinstance(target, str):
            problems.append(where(loc) + f"search.space.{key}: {target}")
            continue
        index, sub = target
        dim = Dimension(key, index, ".".join(["stages", str(index), *sub]), list(values))
        for v in values:  # every value alone must pass the stage's schema (and the recipe's checks)
            try:
                _load(loaded, [dim.override(v)])
            except RecipeError as exc:
                first = exc.problems[0] if hasattr(exc, "problems") else str(exc)
                text = first.split(": ", 1)[1] if first.startswith("search ") else first
                problems.append(where(loc) + f"search.space.{key}: the value {v!r} is refused: {text}")
                break
        dims.append(dim)
    evals = [st.label for st in recipe.stages if declaration(st.type).output == "evaluation"]
    gate = recipe.gate
    candidate = gate.candidate if gate is not None else (evals[-1] if evals else None)
    baseline = gate.baseline if gate is not None else None
    objectives = spec.objectives
    if objectives is None:
        from eval.metrics import metric_keys

        quality = [k for k in (gate.rules if gate else {}) if k in metric_keys()]
        if not quality:
            problems.append(where(("search",)) + "search.objectives: the gate has no metric rule to take the quality "
                            "objective from; set objectives: [cider, params_total]")
        objectives = [*quality[:1], "params_total"]
    if candidate is None:
        problems.append(where(("stages",)) + "stages: no evaluate stage to take the objectives from")
    first = min((d.index for d in dims), default=0)
    if candidate is not None and dims:
        after = [i for i, st in enumerate(recipe.stages) if st.label == candidate]
        if after and after[0] < first:
            problems.append(where(("search", "space")) + f"search.space: every searched stage comes after the "
                            f"evaluation '{candidate}' the objectives are read from; search stages before it")
    if problems:
        raise RecipeError(problems)
    n = trials if trials is not None else spec.trials
    if _sampler_name(spec, dims, n) == "grid":
        n = min(n, math.prod(len(d.values) for d in dims))
    return SearchPlan(
        loaded=loaded, dims=dims, objectives=list(objectives),
        directions=["maximize" if higher_is_better(k) else "minimize" for k in objectives],
        candidate=candidate, baseline=baseline, trials=n, first=first,
    )


def _sampler_name(spec, dims: list[Dimension], trials: int) -> str:
    if spec.sampler != "auto":
        return spec.sampler
    return "grid" if math.prod(len(d.values) for d in dims) <= trials else "tpe"


# --------------------------------------------------------------------------------------------
# Trial recipes
# --------------------------------------------------------------------------------------------


def _is_eval(st) -> bool:
    from compressor.stages import declaration

    return declaration(st.type).output == "evaluation"


def _short_edits(plan: SearchPlan, stages) -> tuple[list[str], tuple[int, ...]]:
    """Overrides and dropped stages of the short rung (see the module docstring)."""
    from compressor.stages import declaration

    b = plan.spec.budget
    latency_kept = any(k.startswith("latency") or k.startswith("tokens_per_s") for k in plan.objectives)
    ovs: list[str] = []
    drop: list[int] = []
    for i, st in enumerate(stages):
        decl = declaration(st.type)
        if _is_eval(st):
            if b.short_eval_limit is not None and hasattr(st, "limit"):
                lim = min(st.limit or b.short_eval_limit, b.short_eval_limit)
                ovs.append(f"stages.{i}.limit={lim}")
            if not latency_kept and hasattr(st, "characteristics"):
                ovs.append(f"stages.{i}.characteristics.latency=null")
            if b.short_torch and getattr(st, "backend", None) == "onnx":
                ovs.append(f"stages.{i}.backend=torch")
        if i < plan.first:
            continue
        if decl.trains and hasattr(st, "train"):
            tr = st.train
            if tr.steps is not None:
                steps = max(1, math.ceil(tr.steps * b.short_fraction))
                ovs.append(f"stages.{i}.train.steps={steps}")
                if tr.warmup_steps >= steps:
                    ovs.append(f"stages.{i}.train.warmup_steps={max(0, steps // 4)}")
            else:
                ovs.append(f"stages.{i}.train.epochs={(tr.epochs or 1.0) * b.short_fraction}")
        if b.short_torch and decl.output == "export":
            drop.append(i)
    return ovs, tuple(drop)


def _quiet(data: dict) -> None:
    """Trials push nothing and draw no plots (the chosen trial's finished run does both)."""
    data["push"] = None
    data.setdefault("report", {})["plots"] = False


def trial_recipe(plan: SearchPlan, values: dict[str, Any], short: bool) -> LoadedRecipe:
    ovs = [d.override(values[d.key]) for d in plan.dims]
    drop: tuple[int, ...] = ()
    if short:
        full = _load(plan.loaded, ovs, edit=_quiet)
        extra, drop = _short_edits(plan, full.recipe.stages)
        ovs += extra
    return _load(plan.loaded, ovs, drop=drop, edit=_quiet)


def prefix_recipe(plan: SearchPlan, short: bool) -> LoadedRecipe | None:
    """The stages before the first searched one, as a recipe of their own (no gate, push, search)."""
    if plan.first == 0:
        return None

    def edit(data):
        _quiet(data)
        data["gate"] = None
        data["search"] = None

    ovs: list[str] = []
    if short:
        ovs, _ = _short_edits(plan, plan.loaded.recipe.stages[: plan.first])
    return _load(plan.loaded, ovs, keep=plan.first, edit=edit)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _run(loaded: LoadedRecipe, run_dir: Path, cache: Path) -> dict:
    """One normal run (resumable); returns its report, also when its gate failed."""
    from compressor.pipeline.runner import Runner

    runner = Runner(loaded, run_dir, resume=True, progress=False, stage_cache=cache)
    try:
        runner.run()
    except GateFailed:
        pass
    return json.loads((run_dir / "report.json").read_text())


def _value(report: dict, label: str, key: str) -> float:
    ev = report.get("evaluations", {}).get(label, {})
    v = ev.get("metrics", {}).get(key, ev.get("characteristics", {}).get(key))
    return float(v) if isinstance(v, (int, float)) else float("nan")


def constraint_values(report: dict) -> list[float]:
    """Each gate verdict as a normalised slack, feasible when ≤ 0 (Optuna's constraints convention)."""
    out = []
    for v in (report.get("gate") or {}).get("verdicts", []):
        obs, t = v.get("observed"), v.get("threshold")
        if not isinstance(obs, (int, float)) or not isinstance(t, (int, float)) or math.isnan(obs):
            out.append(1.0)
            continue
        scale = abs(t) if t else 1.0
        out.append((t - obs) / scale if v.get("rule") in LOWER_BOUND_RULES else (obs - t) / scale)
    return out


#: Short score of a trial that fails a rule on a characteristic (parameters, GFLOPs, size, latency):
#: more healing cannot change those, so it is never promoted while any other trial could be.
UNHEALABLE = 1000.0


def short_score(plan: SearchPlan, report: dict) -> float:
    """The short rung's gate-aware score, minimised (see the module docstring).

    A failed rule on a metric (what the full heal can still recover) scores its normalised
    shortfall (> 0); a failed rule on a characteristic adds :data:`UNHEALABLE`; a trial passing
    every rule scores ``cost / baseline cost - 1`` (≤ 0).
    """
    from eval.metrics import characteristic_keys

    fixed = set(characteristic_keys())
    verdicts = (report.get("gate") or {}).get("verdicts", [])
    cons = constraint_values(report)
    shortfall = sum(max(0.0, c) for c in cons)
    if any(c > 0 and v.get("key") in fixed for v, c in zip(verdicts, cons)):
        shortfall += UNHEALABLE
    if shortfall > 0:
        return shortfall
    cost = plan.objectives[-1]
    c, b = _value(report, plan.candidate, cost), _value(report, plan.baseline or "", cost)
    if len(plan.objectives) < 2 or not b or math.isnan(c) or math.isnan(b):
        q = _value(report, plan.candidate, plan.objectives[0])
        return -q if plan.directions[0] == "maximize" else q
    return c / b - 1.0 if plan.directions[-1] == "minimize" else 1.0 - c / b


def _grid_class():
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """GridSampler without its ``study.stop()`` once the grid is drawn: this loop asks and tells
        outside ``study.optimize`` and stops by counting (``trials`` is at most the grid's size)."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return Grid


def _Grid(*args, **kwargs):  # noqa: N802 - a class built on first use (Optuna is imported lazily)
    return _grid_class()(*args, **kwargs)


class Search:
    """One worker on one study (several may share it; see the module docstring)."""

    def __init__(self, plan: SearchPlan, out: Path, storage: str | None = None):
        self.plan = plan
        self.out = Path(out)
        self.storage_url = storage or f"sqlite:///{(self.out / 'study.db').resolve()}"
        self.name = plan.loaded.recipe.name
        self.cache = self.out / "cache"

    # ---------------------------------------------------------------- Optuna objects
    def storage(self):
        import optuna

        kwargs = {"connect_args": {"timeout": 120}} if self.storage_url.startswith("sqlite") else {}
        self.out.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(self.storage_url, engine_kwargs=kwargs)

    def sampler(self):
        import optuna

        # The recipe's seed (a one-worker search is reproducible); local workers draw differently.
        seed = self.plan.loaded.recipe.seed + int(os.environ.get("COMPRESS_SEARCH_WORKER", "0"))
        name = _sampler_name(self.plan.spec, self.plan.dims, self.plan.spec.trials)
        cons = (lambda ft: ft.user_attrs.get("constraints", [1.0]))  # noqa: E731
        if name == "grid":
            return _Grid({d.key: d.choices for d in self.plan.dims}, seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cons)
        return optuna.samplers.TPESampler(seed=seed, constraints_func=cons, n_startup_trials=4)

    def studies(self, create: bool):
        import optuna

        storage = self.storage()
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=self.plan.spec.budget.reduction_factor, min_early_stopping_rate=0
        )
        if create:
            study = optuna.create_study(storage=storage, study_name=self.name, directions=self.plan.directions,
                                        sampler=self.sampler(), load_if_exists=True)
            rungs = optuna.create_study(storage=storage, study_name=self.name + ".rungs", direction="minimize",
                                        pruner=pruner, load_if_exists=True)
            stored = study.user_attrs.get("search")
            if stored is None:
                study.set_user_attr("search", self.plan.fingerprint())
            elif stored != json.loads(json.dumps(self.plan.fingerprint())):
                raise UserInputError(f"the study '{self.name}' in {self.storage_url} was made with another space or "
                                     "objectives; use another --out or --storage")
        else:
            study = optuna.load_study(study_name=self.name, storage=storage, sampler=self.sampler())
            rungs = optuna.load_study(study_name=self.name + ".rungs", storage=storage, pruner=pruner)
        return study, rungs

    # ---------------------------------------------------------------- the prefix
    def run_base(self) -> None:
        """Run the stages before the first searched stage once (full and short evaluation) into the cache."""
        for short, name in ((False, "base"), (True, "base-short")):
            rec = prefix_recipe(self.plan, short)
            if rec is not None:
                log.info("search: %s: the %d stages before the first searched one", name, self.plan.first)
                _run(rec, self.out / name, self.cache)

    # ---------------------------------------------------------------- the worker loop
    @contextlib.contextmanager
    def _lock(self):
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".ask.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _recover(self, study) -> None:
        """RUNNING trials of this host whose process is gone: FAIL, and their values enqueued again."""
        from optuna.trial import TrialState

        from compressor.pipeline.runner import _alive

        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
                continue
            log.warning("search: trial %d (pid %s) was killed; running its values again", t.number, pid)
            study._storage.set_trial_user_attr(t._trial_id, "killed", True)
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.user_attrs.get("retry_of", t.number)},
                                skip_if_exists=False)

    def _next(self, study):
        """Ask for the next trial under the lock, or None when the study has its trials.

        A draw equal to a trial that is running, waiting or finished (a sampler may repeat itself,
        and workers with different seeds may draw alike) is told at once without running anything
        (``duplicate_of``: the earlier trial's values when it is complete, else pruned) and not
        counted; the worker draws again. It stops when ``trials`` are counted, when every point
        of the space is taken, or after :data:`MAX_REDRAWS` repeats in a row.
        """
        import optuna
        from optuna.trial import TrialState

        dists = {d.key: optuna.distributions.CategoricalDistribution(d.choices) for d in self.plan.dims}
        size = math.prod(len(d.values) for d in self.plan.dims)
        with self._lock():
            self._recover(study)
            for _ in range(MAX_REDRAWS):
                trials = [t for t in study.get_trials(deepcopy=False) if "duplicate_of" not in t.user_attrs]
                waiting = any(t.state == TrialState.WAITING for t in trials)
                counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                           or (t.state == TrialState.FAIL and not t.user_attrs.get("killed"))]
                taken = {_point(t.params): t for t in counted if t.params}
                if not waiting and (len(counted) >= self.plan.trials or len(taken) >= size):
                    return None
                trial = study.ask(dists)
                same = taken.get(_point(trial.params))
                if same is None or same.number == trial.number:
                    trial.set_user_attr("host", socket.gethostname())
                    trial.set_user_attr("pid", os.getpid())
                    return trial
                trial.set_user_attr("duplicate_of", same.number)
                if same.state == TrialState.COMPLETE:
                    for k in ("constraints", "passed", "run", "short_score"):
                        if k in same.user_attrs:
                            trial.set_user_attr(k, same.user_attrs[k])
                    study.tell(trial, same.values)
                else:
                    study.tell(trial, state=TrialState.PRUNED)
            log.warning("search: the sampler drew %d points already taken in a row; stopping", MAX_REDRAWS)
            return None

    def work(self) -> int:
        """Run trials until the study has ``trials`` of them; returns how many this worker ran."""
        study, rungs = self.studies(create=False)
        ran = 0
        while (trial := self._next(study)) is not None:
            self.run_trial(study, rungs, trial)
            ran += 1
        return ran

    def run_trial(self, study, rungs, trial) -> None:
        from optuna.trial import TrialState

        plan = self.plan
        values = {d.key: d.value(trial.params[d.key]) for d in plan.dims}
        folder = self.out / "trials" / f"{trial.user_attrs.get('retry_of', trial.number):04d}"
        t0 = time.perf_counter()
        log.info("search: trial %d %s", trial.number, values)
        try:
            short = _run(trial_recipe(plan, values, short=True), folder / "short", self.cache)
            score = short_score(plan, short)
            trial.set_user_attr("short_score", score)
            trial.set_user_attr("short", {k: _value(short, plan.candidate, k) for k in plan.objectives})
            rung = rungs.ask()
            rung.set_user_attr("trial", trial.number)
            rung.report(score, 1)
            if rung.should_prune():
                rungs.tell(rung, state=TrialState.PRUNED)
                trial.set_user_attr("constraints", constraint_values(short))
                trial.set_user_attr("run", str((folder / "short").relative_to(self.out)))
                trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
                study.tell(trial, state=TrialState.PRUNED)
                log.info("search: trial %d pruned after the short rung (score %.4g)", trial.number, score)
                return
            rungs.tell(rung, score)
            full = _run(trial_recipe(plan, values, short=False), folder / "full", self.cache)
        except CompressError as exc:
            trial.set_user_attr("error", str(exc).splitlines()[0][:500])
            study.tell(trial, state=TrialState.FAIL)
            log.warning("search: trial %d failed: %s", trial.number, exc)
            return
        objective_values = [_value(full, plan.candidate, k) for k in plan.objectives]
        trial.set_user_attr("constraints", constraint_values(full))
        trial.set_user_attr("passed", bool((full.get("gate") or {}).get("passed", True)))
        trial.set_user_attr("run", str((folder / "full").relative_to(self.out)))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        if any(math.isnan(v) for v in objective_values):
            trial.set_user_attr("error", f"objectives missing from the '{plan.candidate}' evaluation")
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, objective_values)


# --------------------------------------------------------------------------------------------
# Driving workers, and the results
# --------------------------------------------------------------------------------------------


def search(plan: SearchPlan, out: Path, storage: str | None, workers: int, worker_args: list[str]) -> dict:
    """Run the whole search: the prefix, ``workers`` local workers (this process is one), the results.

    Args:
        worker_args: the ``compress`` arguments that start one more worker process on the same study.

    Returns:
        The ``pareto.json`` content.
    """
    s = Search(plan, out, storage)
    s.out.mkdir(parents=True, exist_ok=True)
    s.studies(create=True)
    s.run_base()
    procs = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                      os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for i in range(max(0, workers - 1)):
        log_file = open(s.out / f"worker-{i + 1}.log", "ab")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, "-m", "compressor.cli", *worker_args], stdout=log_file,
                                       stderr=subprocess.STDOUT, env={**env, "COMPRESS_SEARCH_WORKER": str(i + 1)}),
                      log_file))
    try:
        s.work()
    finally:
        for p, fh in procs:
            p.wait()
            fh.close()
    bad = [p.returncode for p, _ in procs if p.returncode != 0]
    if bad:
        raise CompressError(f"{len(bad)} worker process(es) failed (exit {bad}); see {s.out}/worker-*.log")
    return write_results(s)


def _rows(s: Search) -> list[dict]:
    from optuna.trial import TrialState

    study, _ = s.studies(create=False)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower()}
        for d in s.plan.dims:
            row[d.key] = d.value(t.params[d.key]) if d.key in t.params else None
        short = t.user_attrs.get("short", {})
        for i, k in enumerate(s.plan.objectives):
            row[k] = t.values[i] if t.state == TrialState.COMPLETE and t.values else None
            row[f"short_{k}"] = short.get(k)
        row["short_score"] = t.user_attrs.get("short_score")
        row["passed"] = t.user_attrs.get("passed") if t.state == TrialState.COMPLETE else None
        for k in ("run", "seconds", "retry_of", "duplicate_of", "error"):
            row[k] = t.user_attrs.get(k)
        rows.append(row)
    return rows


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    sign = [1 if d == "maximize" else -1 for d in directions]
    ge = all(x * s >= y * s for x, y, s in zip(a, b, sign))
    return ge and any(x * s > y * s for x, y, s in zip(a, b, sign))


def write_results(s: Search) -> dict:
    """``trials.csv``, ``pareto.json``, ``pareto.png``, ``report.md``; finish the chosen trial in ``best/``."""
    plan = s.plan
    rows = _rows(s)
    cols = list(rows[0]) if rows else ["trial", "state"]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(s.out / "trials.csv", buf.getvalue())

    done = [r for r in rows if r["state"] == "complete" and r.get("duplicate_of") is None]
    front = [r for r in done if not any(_dominates([o[k] for k in plan.objectives], [r[k] for k in plan.objectives],
                                                   plan.directions) for o in done)]
    front.sort(key=lambda r: r[plan.objectives[-1]])
    passing = [r for r in done if r["passed"]]
    cost, q = plan.objectives[-1], plan.objectives[0]
    sign_c = 1 if plan.directions[-1] == "minimize" else -1
    sign_q = -1 if plan.directions[0] == "maximize" else 1
    chosen = min(passing, key=lambda r: (sign_c * r[cost], sign_q * r[q])) if passing else None
    base = _baseline(s)
    ran = [r for r in rows if r.get("duplicate_of") is None]
    result: dict[str, Any] = {
        "study": s.name, "storage": s.storage_url, "objectives": plan.objectives, "directions": plan.directions,
        # trials that ran (a repeated draw of the sampler is told the earlier trial's values, never run)
        "space": {d.key: d.values for d in plan.dims}, "trials": len(ran), "repeated_draws": len(rows) - len(ran),
        "states": {st: sum(r["state"] == st for r in ran) for st in sorted({r["state"] for r in ran})},
        "baseline": base, "front": front, "chosen": chosen, "best_run": None,
    }
    if chosen is not None:
        values = {d.key: chosen[d.key] for d in plan.dims}
        best = s.out / "best"
        loaded = _load(plan.loaded, [d.override(values[d.key]) for d in plan.dims])
        log.info("search: finishing trial %d as a normal run in %s", chosen["trial"], best)
        try:
            report = _run_best(loaded, best, s.cache)
            result["best_run"] = "best"
            result["best_gate"] = (report.get("gate") or {}).get("passed")
        finally:
            link = s.out / "result"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to("best", target_is_directory=True)
    atomic_write_json(s.out / "pareto.json", result)
    _plot(s, rows, front, chosen, base)
    atomic_write_text(s.out / "report.md", _markdown(s, rows, front, chosen, base))
    return result


def _run_best(loaded: LoadedRecipe, run_dir: Path, cache: Path) -> dict:
    from compressor.pipeline.runner import Runner

    Runner(loaded, run_dir, resume=True, progress=False, stage_cache=cache).run()  # GateFailed propagates (exit 1)
    return json.loads((run_dir / "report.json").read_text())


def _baseline(s: Search) -> dict | None:
    """The baseline evaluation's objective values (from ``base/``), when the gate names a baseline."""
    path = s.out / "base" / "report.json"
    if s.plan.baseline is None or not path.is_file():
        return None
    rep = json.loads(path.read_text())
    return {k: _value(rep, s.plan.baseline, k) for k in s.plan.objectives}


def _thresholds(s: Search, base: dict | None, q: str) -> list[tuple[str, float]]:
    """The gate's rules on objective ``q``, as values of that objective."""
    gate = s.plan.loaded.recipe.gate
    if gate is None or q not in gate.rules:
        return []
    r, b = gate.rules[q], (base or {}).get(q)
    out = []
    if r.min is not None:
        out.append((f"min {r.min:g}", r.min))
    if r.max is not None:
        out.append((f"max {r.max:g}", r.max))
    if b is not None and not math.isnan(b):
        if r.min_recovery is not None:
            out.append((f"recovery ≥ {r.min_recovery:g}", r.min_recovery * b))
        if r.max_drop is not None:
            out.append((f"drop ≤ {r.max_drop:g}", b - r.max_drop))
        if r.max_ratio is not None:
            out.append((f"ratio ≤ {r.max_ratio:g}", r.max_ratio * b))
    return out


def _plot(s: Search, rows, front, chosen, base) -> None:
    from matplotlib.figure import Figure

    from eval.metrics import display_name

    q, c = s.plan.objectives[0], s.plan.objectives[-1]
    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    ax = fig.add_subplot()
    rows = [r for r in rows if r.get("duplicate_of") is None]  # a repeated draw was never run
    done = [r for r in rows if r["state"] == "complete"]
    ok = [r for r in done if r["passed"]]
    bad = [r for r in done if not r["passed"]]
    pruned = [r for r in rows if r["state"] == "pruned" and r.get(f"short_{c}") is not None]
    if pruned:
        ax.scatter([r[f"short_{c}"] for r in pruned], [r[f"short_{q}"] for r in pruned], marker="x", color="0.6",
                   label="pruned (short rung)")
    if bad:
        ax.scatter([r[c] for r in bad], [r[q] for r in bad], facecolors="none", edgecolors="tab:red", label="fails the gate")
    if ok:
        ax.scatter([r[c] for r in ok], [r[q] for r in ok], color="tab:green", label="passes the gate")
    if len(front) > 1 and len(s.plan.objectives) > 1:
        ax.plot([r[c] for r in front], [r[q] for r in front], color="tab:blue", lw=1, label="Pareto front")
    for text, y in _thresholds(s, base, q):
        ax.axhline(y, color="tab:red", ls="--", lw=1, label=f"gate: {display_name(q)} {text}")
    if c != q:
        for text, x in _thresholds(s, base, c):
            ax.axvline(x, color="tab:orange", ls=":", lw=1, label=f"gate: {display_name(c)} {text}")
    if base is not None:
        ax.scatter([base[c]], [base[q]], marker="*", s=160, color="black", label="baseline")
    if chosen is not None:
        ax.scatter([chosen[c]], [chosen[q]], s=220, facecolors="none", edgecolors="tab:blue", lw=2,
                   label=f"chosen: trial {chosen['trial']}")
    ax.set_xlabel(display_name(c))
    ax.set_ylabel(display_name(q))
    ax.set_title(f"compress search {s.name}: {len(done)} complete, {len(pruned)} pruned")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    from eval.plots import save_png

    save_png(fig, s.out / "pareto.png")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _markdown(s: Search, rows, front, chosen, base) -> str:
    keys = [d.key for d in s.plan.dims]
    cols = ["trial", "state", *keys, *s.plan.objectives, "passed", "short_score", "run"]
    front_ids = {r["trial"] for r in front}
    repeated = [r for r in rows if r.get("duplicate_of") is not None]
    rows = [r for r in rows if r.get("duplicate_of") is None]  # repeated draws: counted, listed in trials.csv
    lines = [f"# Search: {s.name}", "",
             f"Objectives: {', '.join(f'{k} ({d})' for k, d in zip(s.plan.objectives, s.plan.directions))}; "
             f"{len(rows)} trials run ({len(repeated)} repeated draws of the sampler told the earlier trial's "
             f"result, not run; see trials.csv); successive halving with η = {s.plan.spec.budget.reduction_factor} "
             f"(Optuna SuccessiveHalvingPruner).", ""]
    if base is not None:
        lines += ["Baseline: " + ", ".join(f"{k} {_fmt(v)}" for k, v in base.items()), ""]
    if chosen is not None:
        lines += [f"Chosen: trial {chosen['trial']} (" + ", ".join(f"{k}={chosen[k]}" for k in keys)
                  + "), finished in `best/` (linked as `result`).", ""]
    else:
        lines += ["No trial passes the gate.", ""]
    lines += ["| " + " | ".join(cols) + " | Pareto |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in cols) + f" | {'*' if r['trial'] in front_ids else ''} |")
    lines += ["", "![Pareto front](pareto.png)", ""]
    return "\n".join(lines)
