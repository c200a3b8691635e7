"""The training loop shared by every prior: AdamW, warm-up + cosine, gradient
clipping, EMA weights, the NLL on held-out sequences with the best checkpoint
kept (the pipeline passes the selection split of bench/data.py, never val), and
resumable checkpoints (model, EMA, optimizer, scheduler, step, RNG and data
position) written atomically.

A prior is trained unit by unit (`Prior.units()`): AR and absorbing have one,
ImageBART one per scale. Each unit gets `train.steps` steps of `train.batch_size`
sequences, so every model sees the same compute (DESIGN.md section 3).
"""
from __future__ import annotations

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


def bits_per_token(loss: torch.Tensor, logs: dict[str, float]) -> float:
    """The unit's likelihood term in bits per token: what a prior logs as `*bits_per_token` (absorbing: its Eq. 6
    ELBO, not the reweighted training loss), else the loss in nats converted to bits."""
    keys = sorted((k for k in logs if k.endswith("bits_per_token")), key=lambda k: not k.startswith("elbo"))
    return float(logs[keys[0]]) if keys else float(loss) / math.log(2)


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
            total += bits_per_token(loss, logs) * len(x)
            n += len(x)
    return total / max(1, n)


RESUMABLE_KEYS = ("arch", "unit", "model", "optimizer", "scheduler", "ema", "step", "best_val", "best_step",
                  "best_state", "seconds", "data_gen", "noise_gen", "torch_rng")


def read_resumable(path: Path, unit: str, arch: dict[str, Any]) -> dict[str, Any] | None:
    """A unit's resumable checkpoint, or None when it cannot be read (truncated by a full disk or a copy,
    damaged): it is moved aside with a warning and the unit trains from scratch, which gives the same weights as
    an uninterrupted run. Without this every rerun would fail on the same file until it was deleted by hand.
    A readable checkpoint of another configuration is the user's to resolve (one-line ConfigError)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"a {type(state).__name__}, not a checkpoint")
        if state.get("arch") != arch or state.get("unit") != unit:
            raise ConfigError(f"checkpoint {path} was written by a different prior configuration "
                              f"({state.get('unit')}: {state.get('arch')}); remove it or use another paths.cache")
        missing = [k for k in RESUMABLE_KEYS if k not in state]
        if missing:
            raise ValueError(f"no {missing[0]}")
        return state
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torch raises on a damaged file, the remedy is the same
        aside = move_aside(path)
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        log.warning("%s: resumable checkpoint %s cannot be read (%s: %s); moved aside to %s, training from scratch",
                    unit, path, type(e).__name__, reason, aside)
        return None


def train_unit(prior: Prior, unit: str, train: torch.Tensor, val: torch.Tensor, cfg: Any, seed: int,
               work_dir: Path, device: torch.device, precision: str = "fp32",
               log_fn: Callable[[dict[str, float], int], None] | None = None,
               stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one unit to `cfg.steps`, resuming from `work_dir/<unit>.ckpt` if present.

    Returns {"state_dict": best EMA weights, "best_val": ..., "best_step": ..., "seconds": ...}.
    `stop_after` ends the run early after that many steps (tests of resume).
    """
    # The global RNG (dropout) starts from the unit's seed: a unit's run does not depend on which units trained
    # before it in the same process, so units can train one after another or at once (train_units).
    torch.manual_seed(seed)
    module = prior.units()[unit]
    ckpt_path = Path(work_dir) / f"{unit}.ckpt"
    steps, bs = int(cfg.steps), int(cfg.batch_size)
    decay_params = [p for n, p in module.named_parameters() if p.dim() >= 2]
    other_params = [p for n, p in module.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": float(cfg.weight_decay)},
                             {"params": other_params, "weight_decay": 0.0}],
                            lr=float(cfg.lr), betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, int(cfg.warmup_steps), steps, float(cfg.min_lr_ratio)))
    ema = {k: v.detach().clone().float() if v.dtype.is_floating_point else v.detach().clone()
           for k, v in module.state_dict().items()}
    # One generator draws the batches (the data-loader position), one the noise of the losses.
    data_gen = torch.Generator().manual_seed(seed * 1000 + 1)
    noise_gen = torch.Generator(device=device).manual_seed(seed * 1000 + 2)
    step, best_val, best_step, best_state, seconds = 0, float("inf"), -1, None, 0.0

    state = read_resumable(ckpt_path, unit, prior.arch_config()) if ckpt_path.is_file() else None
    if state is not None:
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ema = state["ema"]
        step, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        best_state, seconds = state["best_state"], state["seconds"]
        data_gen.set_state(state["data_gen"])
        noise_gen.set_state(state["noise_gen"].to(noise_gen.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        log.info("%s: resumed from %s at step %d/%d", unit, ckpt_path, step, steps)

    def save() -> None:
        atomic_torch_save({
            "version": CKPT_VERSION, "arch": prior.arch_config(), "unit": unit,
            "model": module.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ema": ema, "step": step, "best_val": best_val, "best_step": best_step, "best_state": best_state,
            "seconds": seconds, "data_gen": data_gen.get_state(), "noise_gen": noise_gen.get_state().cpu(),
            "torch_rng": torch.get_rng_state(),
        }, ckpt_path)

    def validate() -> float:
        nonlocal best_val, best_step, best_state
        live = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(ema)
        v = validation_bits(prior, unit, val, bs, int(cfg.val_batches), seed, device, precision)
        module.load_state_dict(live)
        if v < best_val:
            best_val, best_step = v, step
            best_state = {k: t.clone() for k, t in ema.items()}
        return v

    module.train()
    bar = tqdm(total=steps, initial=step, desc=f"train {prior.name}:{unit}", unit="step", leave=False,
               **({} if progress else {"disable": True}))
    with StopFlag() as stop:
        while step < steps:
            t0 = time.perf_counter()
            idx = torch.randint(len(train), (bs,), generator=data_gen)
            x = train[idx].to(device, non_blocking=True)
            with autocast(device, precision):
                loss, logs = prior.unit_loss(unit, x, generator=noise_gen)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(f"non-finite loss ({loss_value}) at step {step + 1} of {prior.name}:{unit}; "
                                    f"last good checkpoint kept at {ckpt_path}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), float(cfg.grad_clip))
            opt.step()
            sched.step()
            ema_update(ema, module, float(cfg.ema_decay))
            step += 1
            dt = time.perf_counter() - t0
            seconds += dt
            tokens_per_s = x.numel() / max(dt, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:.0f}")
            record = {f"train/{unit}/loss": loss_value, f"train/{unit}/lr": sched.get_last_lr()[0],
                      f"train/{unit}/grad_norm": float(grad_norm), f"train/{unit}/tokens_per_s": tokens_per_s}
            record.update({f"train/{unit}/{k}": v for k, v in logs.items()})
            if step % int(cfg.val_every) == 0 or step == steps:
                record[f"val/{unit}/bits_per_token"] = validate()
                log.info("%s:%s step %d/%d: val %.4f bits/token, loss %.4f", prior.name, unit, step, steps,
                         record[f"val/{unit}/bits_per_token"], loss_value)
            if log_fn is not None:
                log_fn(record, step)
            if step % int(cfg.ckpt_every) == 0 or step == steps:
                save()
            if stop.signum is not None:
                save()
                bar.close()
                name = signal.Signals(stop.signum).name
                log.warning("%s at step %d of %s:%s: checkpoint written to %s; the rerun resumes from it",
                            name, step, prior.name, unit, ckpt_path)
                raise Preempted(f"{name} at step {step} of {prior.name}:{unit}; checkpoint written to {ckpt_path}",
                                stop.signum, stop.previous(stop.signum))
            if stop_after is not None and step >= stop_after and step < steps:
                save()
                bar.close()
                return {"stopped_at": step}
    bar.close()
    if best_state is None:  # steps == 0
        best_state = copy.deepcopy(ema)
    return {"state_dict": best_state, "best_val": best_val, "best_step": best_step, "seconds": seconds,
            "steps": step}


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


def _unit_worker(conn, prior: Prior, train: torch.Tensor, val: torch.Tensor, cfg: Any, work_dir: str,
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


def train_units(prior: Prior, train: torch.Tensor, val: torch.Tensor, cfg: Any, seed: int, work_dir: Path,
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
    ctx = multiprocessing.get_context("spawn")  # fork would copy the job's OpenMP pool and logging handlers
    per_worker = max(1, threads // workers)
    level = logging.getLogger().getEffectiveLevel()
    pending = [(u, seeds[u]) for u in units]
    procs: list[tuple[Any, Any]] = []  # (process, its end of the pipe) of the live workers
    unit_of: dict[int, str] = {}  # process id -> the unit it trains now
    failure: tuple[str, str] | None = None  # (exception name, message) of the first unit that failed
    preempted: tuple[str, int] | None = None

    def assign(proc: Any, conn: Any) -> None:
        """Send the next pending unit to a worker and remember which unit it trains."""
        unit, unit_seed = pending.pop(0)
        unit_of[proc.pid] = unit
        conn.send((unit, unit_seed))

    log.info("train %s: %d units, %d at once (%d thread(s) each)", prior.name, len(units), workers, per_worker)
    bar = tqdm(total=len(units), desc=f"train {prior.name} ({workers} at once)", unit="unit", leave=False)
    with _ForwardingStopFlag(lambda: [p for p, _ in procs]) as stop:
        try:
            for _ in range(workers):
                conn, child = ctx.Pipe()
                proc = ctx.Process(target=_unit_worker, name=f"train-{prior.name}", daemon=True,
                                   args=(child, prior, train, val, cfg, str(work_dir), precision, per_worker, level))
                proc.start()
                child.close()
                assign(proc, conn)
                procs.append((proc, conn))
            while procs:
                ready = mp_connection.wait([c for _, c in procs])
                for proc, conn in [pc for pc in procs if pc[1] in ready]:
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):  # the process died (killed, out of memory): EOF or a reset
                        proc.join()
                        msg = ("error", unit_of[proc.pid], "RuntimeError",
                               f"its process exited with code {proc.exitcode}")
                    if msg[0] == "log":  # a line the unit logged: into the job's log, as its own
                        logging.getLogger(msg[1]).log(msg[2], msg[3])
                        continue
                    if msg[0] == "ok":
                        for record, step in msg[2]:
                            if log_fn is not None:
                                log_fn(record, step)
                        done(msg[1], torch.load(Path(work_dir) / f"{msg[1]}.result.pt", map_location="cpu",
                                                weights_only=True))
                        bar.update(1)
                        if pending and failure is None and preempted is None and stop.signum is None:
                            assign(proc, conn)
                            continue
                        conn.send(None)
                    elif msg[0] == "preempted" or stop.signum is not None:
                        preempted = preempted or ((msg[2], int(msg[3])) if msg[0] == "preempted" else
                                                  (f"{signal.Signals(stop.signum).name} while training "
                                                   f"{prior.name}", stop.signum))
                    elif failure is None:
                        failure = (msg[2], f"{prior.name}:{msg[1]}: {msg[3]}")
                        for p, _ in procs:  # the others checkpoint and stop: nothing is lost
                            if p is not proc:
                                _signal(p, signal.SIGTERM)
                    procs.remove((proc, conn))
                    proc.join()
                    conn.close()
        finally:
            for p, c in procs:
                p.terminate()
                p.join()
                c.close()
            bar.close()
    if failure is not None:
        kind, message = failure
        raise {"TrainingError": TrainingError, "ConfigError": ConfigError}.get(kind, RuntimeError)(
            message if kind in ("TrainingError", "ConfigError") else f"training {message} ({kind})")
    if preempted is not None or stop.signum is not None:
        message, signum = preempted or (f"{signal.Signals(stop.signum).name} while training {prior.name}",
                                        stop.signum)
        raise Preempted(message, signum, stop.previous(signum))
