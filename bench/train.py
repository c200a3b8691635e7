"""The training loop shared by every prior and by a tokenizer trained here.

`run_steps` drives a `Steps` task one optimizer step at a time and owns what every training needs the same way:
resumable checkpoints written atomically (the task's state, the step and the RNG), resume from them, preemption
signals turned into a checkpoint and a clean exit, the progress bar and the logger records. Its tasks: a prior's
unit here (`UnitTraining`: AdamW, warm-up + cosine, gradient clipping, EMA weights, validation NLL with the best
checkpoint kept; the pipeline passes the selection split of bench/data.py, never val) and the VQGAN tokenizer
(image_tokenizers.vqgan_train.VQGANTraining).

A prior is trained unit by unit (`Prior.units()`): AR and absorbing have one,
ImageBART one per scale. Each unit gets `train.steps` steps of `train.batch_size`
sequences, so every model sees the same compute (docs/design.md, "Training").
"""
from __future__ import annotations

import abc
import contextlib
import copy
import logging
import math
import multiprocessing
import os
import signal
import time
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from bench.cache import atomic_torch_save, move_aside
from bench.device import autocast
from bench.errors import ConfigError, Preempted
from bench.options import TrainConfig
from priors.base import Prior, eval_mode

log = logging.getLogger(__name__)

CKPT_VERSION = 1


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


# What SLURM sends before preemption or the time limit (SIGTERM; SIGUSR1/SIGUSR2 with --signal, submitit
# uses USR2 by default).
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    """Turns preemption signals into a flag read between optimizer steps, so the step in flight finishes
    and is checkpointed before the job exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for s in PREEMPT_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread (joblib workers): signals keep their handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def previous(self, signum: int) -> Any:
        return self._old.get(signum)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    for k, v in module.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


@torch.no_grad()
def validation_bits(prior: Prior, unit: str, val: torch.Tensor, batch_size: int, batches: int,
                    seed: int, device: torch.device, precision: str) -> float:
    """The unit's NLL (or its ELBO term) in bits per token on fixed batches of held-out sequences (the selection
    split) with a fixed noise seed, so checks at different steps compare."""
    g = torch.Generator(device=device).manual_seed(seed)
    total, n = 0.0, 0
    with eval_mode(prior.units()[unit]):
        for i in range(batches):
            x = val[i * batch_size:(i + 1) * batch_size]
            if len(x) == 0:
                break
            with autocast(device, precision):
                loss, logs = prior.unit_loss(unit, x.to(device), generator=g)
            total += prior.validation_bits(loss, logs) * len(x)
            n += len(x)
    return total / max(1, n)


# ---- the loop -------------------------------------------------------------------

class Steps(abc.ABC):
    """What run_steps drives: one optimizer step at a time, and everything needed to resume between two."""
    what: str  # how logs and errors name the run ("ar:model", "tokenizer")
    owner: str = "prior"  # what its checkpoint's identity belongs to, for messages ("prior", "tokenizer")

    @abc.abstractmethod
    def step(self, step: int) -> tuple[dict[str, float], dict[str, str]]:
        """Step `step` (0-based): (the record for log_fn, empty on steps that log nothing; the progress bar's
        postfix). A non-finite loss raises TrainingError before any update."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything besides the step count and the global RNG that a resumed run needs (tensors and containers,
        readable with weights_only=True)."""

    @abc.abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a state() of an interrupted run."""


def run_steps(task: Steps, steps: int, ckpt_path: Path, identity: dict[str, Any], *, ckpt_every: int,
              log_fn: Callable[[dict[str, float], int], None] | None = None, stop_after: int | None = None,
              progress: bool = True) -> int:
    """Run `task` to `steps` steps, resuming from ckpt_path if it holds a checkpoint of the same identity ("arch",
    "unit"). A resumable checkpoint (the task's state, the step, the global RNG) is written atomically every
    ckpt_every steps, at the end, on a preemption signal (then Preempted is raised) and at stop_after (then the
    run ends early: tests of resume). Returns the steps done."""
    keys = tuple(identity) + ("step", "torch_rng") + tuple(task.state())
    state = read_resumable(ckpt_path, identity, keys, task.owner) if ckpt_path.is_file() else None
    step = 0
    if state is not None:
        task.load_state(state)
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        log.info("%s: resumed from %s at step %d/%d", task.what, ckpt_path, step, steps)

    def save() -> None:
        atomic_torch_save({"version": CKPT_VERSION, **identity, **task.state(), "step": step,
                           "torch_rng": torch.get_rng_state()}, ckpt_path)

    bar = tqdm(total=steps, initial=step, desc=f"train {task.what}", unit="step", leave=False,
               **({} if progress else {"disable": True}))
    try:
        with StopFlag() as stop:
            while step < steps:
                try:
                    record, postfix = task.step(step)
                except TrainingError as e:
                    raise TrainingError(f"{e}; last good checkpoint kept at {ckpt_path}") from None
                step += 1
                bar.update(1)
                bar.set_postfix(postfix, refresh=False)
                if log_fn is not None and record:
                    log_fn(record, step)
                if step % ckpt_every == 0 or step == steps:
                    save()
                if stop.signum is not None:
                    save()
                    name = signal.Signals(stop.signum).name
                    log.warning("%s at step %d of %s: checkpoint written to %s; the rerun resumes from it",
                                name, step, task.what, ckpt_path)
                    raise Preempted(f"{name} at step {step} of {task.what}; checkpoint written to {ckpt_path}",
                                    stop.signum, stop.previous(stop.signum))
                if stop_after is not None and stop_after <= step < steps:
                    save()
                    break
    finally:
        bar.close()
    return step


def read_resumable(path: Path, identity: dict[str, Any], keys: tuple[str, ...], owner: str = "prior"
                   ) -> dict[str, Any] | None:
    """A resumable checkpoint, or None when it cannot be read (truncated by a full disk or a copy, damaged): it is
    moved aside with a warning and the run starts from scratch, which gives the same weights as an uninterrupted
    run. Without this every rerun would fail on the same file until it was deleted by hand. A readable checkpoint
    of another configuration (another `identity`) is the user's to resolve (one-line ConfigError)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"a {type(state).__name__}, not a checkpoint")
        if any(state.get(k) != v for k, v in identity.items()):
            raise ConfigError(f"checkpoint {path} was written by a different {owner} configuration "
                              f"({state.get('unit')}: {state.get('arch')}); remove it or use another paths.cache")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"no {missing[0]}")
        return state
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torch raises on a damaged file, the remedy is the same
        aside = move_aside(path)
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        log.warning("%s: resumable checkpoint %s cannot be read (%s: %s); moved aside to %s, training from scratch",
                    identity.get("unit"), path, type(e).__name__, reason, aside)
        return None


# ---- one unit of a prior --------------------------------------------------------

class UnitTraining(Steps):
    """One unit of a prior: AdamW (no decay on vectors), warm-up + cosine, gradient clipping, EMA weights, and
    the validation NLL of the EMA weights every val_every steps with the best ones kept."""

    def __init__(self, prior: Prior, unit: str, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig, seed: int,
                 device: torch.device, precision: str):
        self.prior, self.unit, self.train_tokens, self.val_tokens = prior, unit, train, val
        self.cfg, self.seed, self.device, self.precision = cfg, seed, device, precision
        self.what = f"{prior.name}:{unit}"
        self.module = prior.units()[unit]
        decay_params = [p for n, p in self.module.named_parameters() if p.dim() >= 2]
        other_params = [p for n, p in self.module.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": cfg.weight_decay},
                                      {"params": other_params, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=tuple(cfg.betas))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.ema = {k: v.detach().clone().float() if v.dtype.is_floating_point else v.detach().clone()
                    for k, v in self.module.state_dict().items()}
        # One generator draws the batches (the data-loader position), one the noise of the losses.
        self.data_gen = torch.Generator().manual_seed(seed * 1000 + 1)
        self.noise_gen = torch.Generator(device=device).manual_seed(seed * 1000 + 2)
        self.best_val, self.best_step, self.best_state, self.seconds = float("inf"), -1, None, 0.0
        self.module.train()

    def state(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "ema": self.ema, "best_val": self.best_val,
                "best_step": self.best_step, "best_state": self.best_state, "seconds": self.seconds,
                "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state().cpu()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema = state["ema"]
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        self.best_state, self.seconds = state["best_state"], state["seconds"]
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"].to(self.noise_gen.get_state().device))

    def step(self, step: int) -> tuple[dict[str, float], dict[str, str]]:
        t0 = time.perf_counter()
        idx = torch.randint(len(self.train_tokens), (self.cfg.batch_size,), generator=self.data_gen)
        x = self.train_tokens[idx].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            loss, logs = self.prior.unit_loss(self.unit, x, generator=self.noise_gen)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"non-finite loss ({loss_value}) at step {step + 1} of {self.what}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema, self.module, self.cfg.ema_decay)
        dt = time.perf_counter() - t0
        self.seconds += dt
        tokens_per_s = x.numel() / max(dt, 1e-9)
        u = self.unit
        record = {f"train/{u}/loss": loss_value, f"train/{u}/lr": self.sched.get_last_lr()[0],
                  f"train/{u}/grad_norm": float(grad_norm), f"train/{u}/tokens_per_s": tokens_per_s}
        record.update({f"train/{u}/{k}": v for k, v in logs.items()})
        done = step + 1
        if done % self.cfg.val_every == 0 or done == self.cfg.steps:
            record[f"val/{u}/bits_per_token"] = self.validate(done)
            log.info("%s step %d/%d: val %.4f bits/token, loss %.4f", self.what, done, self.cfg.steps,
                     record[f"val/{u}/bits_per_token"], loss_value)
        return record, {"loss": f"{loss_value:.3f}", "tok_s": f"{tokens_per_s:.0f}"}

    def validate(self, step: int) -> float:
        """The EMA weights' validation bits per token; the best EMA weights so far are kept."""
        live = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.ema)
        v = validation_bits(self.prior, self.unit, self.val_tokens, self.cfg.batch_size, self.cfg.val_batches,
                            self.seed, self.device, self.precision)
        self.module.load_state_dict(live)
        if v < self.best_val:
            self.best_val, self.best_step = v, step
            self.best_state = {k: t.clone() for k, t in self.ema.items()}
        return v

    def result(self, steps: int) -> dict[str, Any]:
        """{"state_dict": the best EMA weights so far (the EMA ones before any validation), "best_val",
        "best_step", "seconds", "steps": steps done}."""
        best = self.best_state if self.best_state is not None else copy.deepcopy(self.ema)
        return {"state_dict": best, "best_val": self.best_val, "best_step": self.best_step, "seconds": self.seconds,
                "steps": steps}


def train_unit(prior: Prior, unit: str, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig, seed: int,
               work_dir: Path, device: torch.device, precision: str = "fp32",
               log_fn: Callable[[dict[str, float], int], None] | None = None,
               stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one unit to `cfg.steps`, resuming from `work_dir/<unit>.ckpt` if present; UnitTraining.result.

    `stop_after` ends the run early after that many steps (tests of resume): "steps" then says where.
    """
    # The global RNG (dropout) starts from the unit's seed: a unit's run does not depend on which units trained
    # before it in the same process, so units can train one after another or at once (train_units).
    torch.manual_seed(seed)
    task = UnitTraining(prior, unit, train, val, cfg, seed, device, precision)
    steps = run_steps(task, cfg.steps, Path(work_dir) / f"{unit}.ckpt", {"arch": prior.arch_config(), "unit": unit},
                      ckpt_every=cfg.ckpt_every, log_fn=log_fn, stop_after=stop_after, progress=progress)
    return task.result(steps)


# ---- units at once ---------------------------------------------------------------

def resolve_unit_workers(want: Any, n_units: int, device: torch.device, threads: int) -> int:
    """`unit_workers`: how many of a prior's units train at once, each in its own process with
    threads // unit_workers CPU threads. auto = min(units, threads) on CPU, 1 on CUDA.

    Why on CPU: a small unit's step is dominated by per-operation overhead, which a second thread does not
    share (an ImageBART T=9 scale of 50k parameters: 7.3 s per 100 steps on 1 thread, 7.2 s on 2), while two
    processes run two units in the time of one."""
    if str(want) == "auto":
        return 1 if device.type != "cpu" else max(1, min(n_units, threads))
    if isinstance(want, bool) or not isinstance(want, int) or want < 1:
        raise ConfigError(f"unit_workers={want} must be a positive integer or auto")
    if want > 1 and device.type != "cpu":
        raise ConfigError(f"unit_workers={want}: units train at once only on CPU (device={device.type}); use 1")
    return max(1, min(want, n_units))


def _unit_worker(conn, prior: Prior, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig, work_dir: str,
                 precision: str, threads: int, level: int) -> None:
    """A process that trains the units the job sends it, one at a time (train_units). Each result goes to
    `<unit>.result.pt` in the work folder; the pipe carries the unit's logger records back, or what stopped it.
    One process serves several units, so the interpreter and torch start once per worker, not once per unit."""
    import traceback

    _stop_with_parent()
    torch.set_num_threads(threads)
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(conn)]  # the unit's log lines go to the job's handlers (run.log, console)
    root.setLevel(level)
    try:
        while (task := conn.recv()) is not None:
            unit, seed = task
            records: list[tuple[dict[str, float], int]] = []
            try:
                r = train_unit(prior, unit, train, val, cfg, seed, Path(work_dir), torch.device("cpu"), precision,
                               log_fn=lambda rec, step: records.append(({k: float(v) for k, v in rec.items()},
                                                                        step)),
                               progress=False)
                atomic_torch_save(r, Path(work_dir) / f"{unit}.result.pt")
                conn.send(("ok", unit, records))
            except Preempted as e:
                with contextlib.suppress(OSError):  # the job may be gone (the signal came from its death)
                    conn.send(("preempted", unit, str(e), e.signum))
                return
            except BaseException as e:  # noqa: BLE001 - reported to the job, which raises it there
                if not isinstance(e, (TrainingError, ConfigError)):  # those say all in one line
                    traceback.print_exc()
                conn.send(("error", unit, type(e).__name__, str(e)))
                return
    finally:
        conn.close()


class _PipeLogHandler(logging.Handler):
    """A worker's log records, sent to the job (train_units), which hands them to its own logging."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self._conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):  # the job may be gone (the signal came from its death)
            self._conn.send(("log", record.name, record.levelno, record.getMessage()))


def _stop_with_parent() -> None:
    """Linux: SIGTERM to this process when the job's process dies (SIGKILL, out of memory), so an orphaned worker
    checkpoints and exits instead of training on beside the job's rerun. Elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _ForwardingStopFlag(StopFlag):
    """The job's preemption flag while units train in processes: the signal is passed on to them, so each
    checkpoints the step in flight (under SLURM they usually get it directly too; twice does no harm)."""

    def __init__(self, processes: Callable[[], list[Any]]) -> None:
        super().__init__()
        self._processes = processes

    def _handle(self, signum, frame) -> None:
        super()._handle(signum, frame)
        for p in self._processes():
            _signal(p, signum)


def _signal(process: Any, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited a moment ago
        if process.is_alive():
            os.kill(process.pid, signum)


def train_units(prior: Prior, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig, seed: int, work_dir: Path,
                device: torch.device, precision: str = "fp32", workers: int = 1, threads: int = 1,
                log_fn: Callable[[dict[str, float], int], None] | None = None,
                on_done: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Train every unit of `prior` (unit i with seed `seed * 100 + i`), calling `on_done(unit, result)` as each
    finishes. With `workers` > 1 (CPU) that many units train at once, each in a spawned process with
    threads // workers threads; each unit's run is the same as alone in a process with that many threads."""
    units = list(prior.units())
    seeds = {u: seed * 100 + i for i, u in enumerate(units)}
    done = on_done or (lambda unit, result: None)
    workers = min(workers, len(units))
    if workers <= 1 or len(units) <= 1:
        for u in units:
            done(u, train_unit(prior, u, train, val, cfg, seeds[u], work_dir, device, precision, log_fn=log_fn))
        return
    if device.type != "cpu":
        raise ConfigError(f"unit_workers={workers}: units train at once only on CPU (device={device.type})")
    log.info("train %s: %d units, %d at once (%d thread(s) each)", prior.name, len(units), workers,
             max(1, threads // workers))
    _UnitPool(prior, (train, val, cfg, str(work_dir), precision), [(u, seeds[u]) for u in units], workers,
              threads, log_fn, done).run()


class _UnitPool:
    """train_units with units at once: spawned workers, each sent the next pending unit when it finishes one. A
    failing unit stops the others (they checkpoint: nothing is lost) and its error is raised in the job; a
    preemption signal is passed on to the workers and raised as Preempted once they have checkpointed."""

    def __init__(self, prior: Prior, job: tuple[Any, ...], pending: list[tuple[str, int]], workers: int,
                 threads: int, log_fn: Callable[[dict[str, float], int], None] | None,
                 done: Callable[[str, dict[str, Any]], None]):
        self.prior, self.job, self.pending, self.workers = prior, job, pending, workers
        self.per_worker = max(1, threads // workers)
        self.log_fn, self.done = log_fn, done
        self.work_dir = Path(job[3])
        self.procs: list[tuple[Any, Any]] = []  # (process, its end of the pipe) of the live workers
        self.unit_of: dict[int, str] = {}  # process id -> the unit it trains now
        self.failure: tuple[str, str] | None = None  # (exception name, message) of the first unit that failed
        self.preempted: tuple[str, int] | None = None

    def assign(self, proc: Any, conn: Any) -> None:
        """Send the next pending unit to a worker and remember which unit it trains."""
        unit, unit_seed = self.pending.pop(0)
        self.unit_of[proc.pid] = unit
        conn.send((unit, unit_seed))

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy the job's OpenMP pool and logging handlers
        level = logging.getLogger().getEffectiveLevel()
        train, val, cfg, work_dir, precision = self.job
        for _ in range(self.workers):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_unit_worker, name=f"train-{self.prior.name}", daemon=True,
                               args=(child, self.prior, train, val, cfg, work_dir, precision, self.per_worker, level))
            proc.start()
            child.close()
            self.assign(proc, conn)
            self.procs.append((proc, conn))

    def run(self) -> None:
        bar = tqdm(total=len(self.pending), desc=f"train {self.prior.name} ({self.workers} at once)", unit="unit",
                   leave=False)
        with _ForwardingStopFlag(lambda: [p for p, _ in self.procs]) as stop:
            try:
                self.start()
                while self.procs:
                    ready = mp_connection.wait([c for _, c in self.procs])
                    for proc, conn in [pc for pc in self.procs if pc[1] in ready]:
                        self.receive(proc, conn, stop, bar)
            finally:
                for p, c in self.procs:
                    p.terminate()
                    p.join()
                    c.close()
                bar.close()
        self.raise_outcome(stop)

    def receive(self, proc: Any, conn: Any, stop: StopFlag, bar: Any) -> None:
        """One message of a worker: a log line, a finished unit (then its next one), or what stopped it."""
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the process died (killed, out of memory): EOF or a reset
            proc.join()
            msg = ("error", self.unit_of[proc.pid], "RuntimeError", f"its process exited with code {proc.exitcode}")
        if msg[0] == "log":  # a line the unit logged: into the job's log, as its own
            logging.getLogger(msg[1]).log(msg[2], msg[3])
            return
        if msg[0] == "ok":
            for record, step in msg[2]:
                if self.log_fn is not None:
                    self.log_fn(record, step)
            self.done(msg[1], torch.load(self.work_dir / f"{msg[1]}.result.pt", map_location="cpu",
                                         weights_only=True))
            bar.update(1)
            if self.pending and self.failure is None and self.preempted is None and stop.signum is None:
                self.assign(proc, conn)
                return
            conn.send(None)
        elif msg[0] == "preempted" or stop.signum is not None:
            self.preempted = self.preempted or ((msg[2], int(msg[3])) if msg[0] == "preempted" else
                                                (f"{signal.Signals(stop.signum).name} while training "
                                                 f"{self.prior.name}", stop.signum))
        elif self.failure is None:
            self.failure = (msg[2], f"{self.prior.name}:{msg[1]}: {msg[3]}")
            for p, _ in self.procs:  # the others checkpoint and stop: nothing is lost
                if p is not proc:
                    _signal(p, signal.SIGTERM)
        self.procs.remove((proc, conn))
        proc.join()
        conn.close()

    def raise_outcome(self, stop: StopFlag) -> None:
        """The first failure, else the preemption, as the job's exception; nothing when every unit finished."""
        if self.failure is not None:
            kind, message = self.failure
            raise {"TrainingError": TrainingError, "ConfigError": ConfigError}.get(kind, RuntimeError)(
                message if kind in ("TrainingError", "ConfigError") else f"training {message} ({kind})")
        if self.preempted is not None or stop.signum is not None:
            message, signum = self.preempted or (f"{signal.Signals(stop.signum).name} while training "
                                                 f"{self.prior.name}", stop.signum)
            raise Preempted(message, signum, stop.previous(signum))
