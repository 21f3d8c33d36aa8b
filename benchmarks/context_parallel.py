"""Context-parallel benchmark: one LongLoRA training step with the sequence split over P processes vs one.

Run ``python -m benchmarks --context-parallel 2 --shape 7b-proxy --seq-lens 4096 8192 --rounds 3``
(``python -m benchmarks.context_parallel`` takes the same arguments).

For every sequence length ``N`` the same training step runs at degree 1 (one process, the whole sequence)
and at degree ``P`` (``P`` processes, each holding a contiguous ``N/P`` slice, as the recipe's
``context_parallel_degree`` does): the model of :mod:`benchmarks.train_step` (S² with group
``N/4``, LoRA on q/k/v/o, trainable embeddings and norms, activation checkpointing, chunked loss), labels
shifted before the split, global RoPE positions, the halo-exchange S² of
:mod:`longlora_tune.modules.context_parallel` (forward and backward), the summed token loss divided by the
global token count, and an AdamW step. The ranks are launched as ``torchrun`` would (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and join through
:func:`longlora_tune.training.distributed.init_process_group`: gloo on CPU, nccl (with gloo beside it) on
CUDA. Each rank times its steps with :func:`~benchmarks.train_step.measure_steps` (one warm-up, then
``--repeats`` steps); ``--rounds`` repeats the sweep with degree 1 and ``P`` interleaved, each run in fresh
processes.

Reported per (``N``, degree): the step time (per step, the slowest rank's; median and min-max), the CPU time
per step summed over the ranks, tokens/s of the whole sequence, each rank's peak memory (as
``measure_steps`` reports it: on CPU the peak-RSS increase over the built model), and the communication:

* **halo**: the bytes the halo exchange actually posted, counted by
  :func:`~longlora_tune.modules.context_parallel.count_halo_traffic` during every step, per layer per step
  across one rank boundary (forward tails, once more for the activation-checkpointing recomputation, and
  their gradients back), checked against
  :func:`~longlora_tune.plan.communication.halo_bytes_per_layer` (``halo_matches_formula``); ring
  attention's bytes for the same step (:func:`~longlora_tune.plan.communication.ring_bytes_per_layer`)
  for comparison;
* **gradients**: the benchmark replicates the model on every rank (no FSDP) and all-reduces the trainable
  gradients once per step in one flat buffer; its payload per rank is reported separately. The recipe's
  FSDP2 parameter all-gathers and gradient reduce-scatters are not part of this benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss

from benchmarks.cli import add_step_arguments, resolve_step_arguments
from benchmarks.train_step import (
    VARIANTS,
    Case,
    add_flops,
    measure_steps,
    merge_rounds,
    resolve_shape,
    step_time_fields,
    worker_env,
)
from longlora_tune._io import atomic_write_json
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models import longlora_llama2
from longlora_tune.models.trainable import set_trainable_params
from longlora_tune.modules.context_parallel import (
    HaloTraffic,
    check_context_parallel,
    context_parallel_attention,
    count_halo_traffic,
    split_batch_for_context_parallel,
)
from longlora_tune.modules.loss import summed_token_loss
from longlora_tune.modules.s2_attention import S2AttentionConfig
from longlora_tune.plan.communication import (
    halo_bytes_per_layer,
    ring_bytes_per_layer,
)
from longlora_tune.training.distributed import (
    close_process_group,
    init_process_group,
    parallel_layout,
    resolve_device,
    resolve_dtype,
)

__all__ = ["combine_ranks", "comparisons", "launch", "main", "markdown", "run_rank"]

_WORKER_FLAG = "--cp-worker"
_IGNORE_INDEX = -100


def _group_size(seq_len: int) -> int:
    # The model's S² group at max_seq_len = N: the builders' default rule (as in train_step).
    return S2AttentionConfig().resolve_group_size(seq_len)


def run_rank(case: Case, degree: int) -> dict[str, Any]:
    """Build the model of ``case`` and time its training steps as one rank of a context-parallel group.

    Degree 1 runs the recipe's single-process step (no process group, plain S²); degree ``P`` expects the
    torchrun environment (``RANK``, ``WORLD_SIZE`` = ``P``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Args:
        case: The case (``seq_len`` is the whole sequence ``N``; variant ``longlora``).
        degree: Context-parallel degree ``P`` (the world size).

    Returns:
        :func:`~benchmarks.train_step.measure_steps`'s fields of this rank plus ``rank``,
        ``context_parallel_degree``, ``halo`` (this rank's :class:`HaloTraffic` counts of one step; the
        same every step, else ``halo_steps_differ``), ``grad_allreduce_bytes`` (payload per step) and
        ``loss`` (this rank's share of the global mean loss of the last step).

    Raises:
        ValueError: If the device, dtype, degree or length does not work here.
    """
    try:
        device = resolve_device(case.device)
        dtype = resolve_dtype(case.dtype, device)
        group_size = _group_size(case.seq_len)
        check_context_parallel(case.seq_len, degree, group_size)
    except LongLoRAConfigError as e:
        raise ValueError(str(e)) from e
    if case.variant != "longlora" or case.backend != "sdpa":
        raise ValueError("the context-parallel benchmark runs the longlora variant with the sdpa S2 backend")
    if device.type == "cpu":
        torch.set_num_threads(case.threads)
    created = init_process_group(device, solo_group=False) if degree > 1 else False
    try:
        if degree > 1 and not dist.is_initialized():
            raise ValueError(
                f"context-parallel degree {degree} needs a process group: launch the ranks with "
                "benchmarks.context_parallel.launch or torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT)"
            )
        if degree > 1 and dist.get_world_size() != degree:
            raise ValueError(f"world size {dist.get_world_size()} != context-parallel degree {degree}")
        layout = parallel_layout(device.type, degree)
        return _measure_rank(case, layout, device, dtype, group_size)
    finally:
        close_process_group(created)


def _measure_rank(
    case: Case, layout: Any, device: torch.device, dtype: torch.dtype, group_size: int
) -> dict[str, Any]:
    degree = layout.cp_degree
    _, extras = VARIANTS[case.variant]
    shape = resolve_shape(case.shape, case.layers)
    load_before = os.getloadavg()
    torch.manual_seed(0)  # every rank builds the same weights, as the recipe's broadcast from rank 0 does
    with training.set_default_dtype(dtype), device:
        model = longlora_llama2(**asdict(shape), max_seq_len=case.seq_len, s2_backend=case.backend)
    set_trainable_params(model, extras=extras)
    if case.activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.train()
    model.set_num_output_chunks(case.loss_chunks)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=case.loss_chunks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (case.batch_size, case.seq_len), generator=generator)
    # torchtune's labels are the tokens themselves; the split shifts them before slicing, so the slice's
    # last token keeps its target and only the sequence's last token is unscored (degree 1 the same).
    part = split_batch_for_context_parallel(
        {"tokens": tokens, "labels": tokens}, rank=layout.cp_rank, degree=degree, ignore_index=_IGNORE_INDEX
    )
    batch = {k: v.to(device) for k, v in part.batch.items()}
    scored = case.batch_size * (case.seq_len - 1)  # the global token count the recipe all-reduces
    grad_bytes = sum(p.numel() * p.element_size() for p in params) if degree > 1 else 0
    halos: list[dict[str, dict[str, int]]] = []

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        attention = (
            context_parallel_attention(model, group=layout.cp_group)
            if degree > 1
            else contextlib.nullcontext()
        )
        with count_halo_traffic() as traffic, attention:
            loss_sum, _ = summed_token_loss(
                model, loss_fn, batch, device=device, ignore_index=_IGNORE_INDEX, labels_shifted=True
            )
            loss = loss_sum / scored
            loss.backward()
        if degree > 1:
            # Every slice's gradient is a part of the whole sequence's: sum them (one flat message).
            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=layout.cp_group)
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))
        optimizer.step()
        halos.append(traffic.as_dict())
        return float(loss.detach())

    result = measure_steps(case, device, step, load_before=load_before)
    add_flops(result, case, shape, group_size, device)
    result.update(
        rank=layout.cp_rank,
        context_parallel_degree=degree,
        group_size=group_size,
        halo=halos[-1],
        halo_steps_differ=any(h != halos[0] for h in halos),
        grad_allreduce_bytes=grad_bytes,
        num_layers=shape.num_layers,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
    )
    return result


def combine_ranks(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One result for a context-parallel run from its ranks' results.

    A step is done when its slowest rank is (the halo exchange and the gradient all-reduce synchronise
    them), so each step's wall time is the maximum over the ranks; CPU time is summed (the work of the
    step); memory is per rank (the maximum). Halo bytes per layer per step are those crossing one rank
    boundary: everything the ranks sent divided by the ``P - 1`` boundaries and the layers.

    Args:
        ranks: :func:`run_rank` results of every rank of one run, in any order.

    Returns:
        The combined result: rank 0's fields with the times, memory and loss replaced, plus
        ``halo_bytes_per_layer`` (``forward``, ``backward``, ``mask``, ``total``), ``halo_formula_bytes``,
        ``halo_matches_formula``, ``ring_formula_bytes`` and ``per_rank_peak_mem_over_model_bytes``.
    """
    ranks = sorted(ranks, key=lambda r: r["rank"])
    degree = ranks[0]["context_parallel_degree"]
    if len(ranks) != degree:
        raise ValueError(f"expected {degree} rank results, got {len(ranks)}")
    out = dict(ranks[0])
    out.pop("rank", None)
    times = [max(ts) for ts in zip(*(r["step_s"] for r in ranks))]
    cpu = [sum(ts) for ts in zip(*(r["cpu_step_s"] for r in ranks))]
    over = [r.get("peak_mem_over_model_bytes") for r in ranks]
    peaks = [r.get("peak_mem_bytes") for r in ranks]
    out.update(step_time_fields(times, cpu, out["batch_size"] * out["seq_len"]))
    out.update(
        model_tflops_per_s=out["model_flops"] / out["median_s"] / 1e12,
        warmup_s=max(r["warmup_s"] for r in ranks),
        loss=sum(r["loss"] for r in ranks),  # each rank's share of the global mean
        peak_mem_bytes=max(peaks) if None not in peaks else None,
        peak_mem_over_model_bytes=max(over) if None not in over else None,
        per_rank_peak_mem_over_model_bytes=over,
        halo_steps_differ=any(r["halo_steps_differ"] for r in ranks),
    )
    boundaries = max(degree - 1, 1)
    layers = out["num_layers"]
    sent = {k: sum(r["halo"]["sent"][k] for r in ranks) for k in HaloTraffic.PASSES}
    received = {k: sum(r["halo"]["received"][k] for r in ranks) for k in HaloTraffic.PASSES}
    per_layer = {k: sent[k] / boundaries / layers for k in HaloTraffic.PASSES}
    per_layer["total"] = sum(per_layer.values())
    shape = resolve_shape(out["shape"], out["layers"])
    common = dict(
        batch_size=out["batch_size"],
        head_dim=shape.head_dim,
        degree=degree,
        dtype_bytes=out["dtype_bytes"],
        recompute=out["activation_checkpointing"],
    )
    formula = halo_bytes_per_layer(num_heads=shape.num_heads, group_size=out["group_size"], **common)
    out.update(
        halo_bytes_per_layer=per_layer,
        halo_sent_equals_received=sent == received,
        halo_formula_bytes=formula,
        halo_matches_formula=per_layer["total"] == formula and sent == received,
        ring_formula_bytes=ring_bytes_per_layer(
            num_kv_heads=shape.num_kv_heads, slice_len=out["seq_len"] // degree, **common
        ),
        rank_results=[{k: r[k] for k in ("step_s", "cpu_step_s", "halo", "loss")} for r in ranks],
    )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: Case, degree: int, timeout: float | None) -> dict[str, Any]:
    """Run ``case`` in ``degree`` fresh processes (torchrun's environment) and combine their results.

    Args:
        case: What to measure (``seq_len`` = the whole sequence).
        degree: Context-parallel degree = number of processes (1: one process, no process group).
        timeout: Seconds for all ranks together (None: no limit); a rank that fails stops the others.

    Returns:
        :func:`combine_ranks` of the ranks' results, or the case with ``error`` (one line).
    """
    env = worker_env(case)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(degree))
    spec = json.dumps({"case": asdict(case), "degree": degree})
    cmd = [sys.executable, "-m", "benchmarks.context_parallel", _WORKER_FLAG, spec]
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        procs, logs = [], []
        for rank in range(degree):
            out, err = Path(tmp, f"{rank}.out"), Path(tmp, f"{rank}.err")
            logs.append((out, err))
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            if degree == 1:  # the single-process step: no process group
                for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    rank_env.pop(key)
            with out.open("w") as fo, err.open("w") as fe:
                procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=rank_env))
        deadline = None if timeout is None else time.monotonic() + timeout
        error = None
        while any(p.poll() is None for p in procs):
            # A rank that died leaves its peers waiting in the exchange: stop them all.
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                error = "a rank failed" if failed else f"timed out after {timeout:.0f} s"
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for p in procs:
                    p.wait()
                break
            time.sleep(0.2)
        results = []
        for rank, (p, (out, err)) in enumerate(zip(procs, logs)):
            lines = [line for line in out.read_text().splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                tail = (err.read_text() or out.read_text()).strip().splitlines()[-3:]
                error = f"rank {rank} exited {p.returncode}: " + " | ".join(tail)
                break
            results.append(json.loads(lines[-1]))
    if error is None:
        worker_errors = [r["error"] for r in results if "error" in r]
        error = worker_errors[0] if worker_errors else None
    if error is not None:
        return {**asdict(case), "context_parallel_degree": degree, "error": error}
    return combine_ranks(results)


def _worker(spec: str) -> None:
    payload = json.loads(spec)
    case = Case(**payload["case"])
    try:
        result = run_rank(case, payload["degree"])
    except ValueError as err:
        result = {**asdict(case), "rank": int(os.environ.get("RANK", 0)), "error": str(err)}
    print(json.dumps(result), flush=True)


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    merged = merge_rounds(rounds)
    ok = [r for r in rounds if "error" not in r]
    if ok:
        # Per rank: the largest over the rounds (each round is a fresh set of processes).
        per_rank = [r["per_rank_peak_mem_over_model_bytes"] for r in ok]
        merged["per_rank_peak_mem_over_model_bytes"] = [
            max(v) if None not in v else None for v in zip(*per_rank)
        ]
        merged["losses"] = [r["loss"] for r in ok]
        merged["halo_matches_formula"] = all(r["halo_matches_formula"] for r in ok)
        merged["halo_steps_differ"] = any(r["halo_steps_differ"] for r in ok)
    return merged


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Degree ``P`` against degree 1 for every sequence length measured at both.

    Args:
        results: Combined results merged over rounds.

    Returns:
        One row per (sequence length, degree > 1): ``speedup`` (degree-1 median step time over degree
        ``P``'s), ``cpu_ratio`` (summed CPU time per step, degree ``P`` over degree 1), ``mem_ratio`` (peak
        per rank, degree ``P`` over 1; None when unmeasured) and ``loss_rel_diff`` (last-step losses).
    """
    rows = []
    ok = [r for r in results if "error" not in r]
    for r in ok:
        if r["context_parallel_degree"] == 1:
            continue
        base = next(
            (b for b in ok if b["context_parallel_degree"] == 1 and b["seq_len"] == r["seq_len"]), None
        )
        if base is None:
            continue
        mem = (r.get("peak_mem_over_model_bytes"), base.get("peak_mem_over_model_bytes"))
        rows.append(
            {
                "seq_len": r["seq_len"],
                "degree": r["context_parallel_degree"],
                "speedup": base["median_s"] / r["median_s"],
                "cpu_ratio": r["median_cpu_s"] / base["median_cpu_s"],
                "mem_ratio": mem[0] / mem[1] if mem[0] and mem[1] else None,
                "loss_rel_diff": abs(r["loss"] - base["loss"]) / abs(base["loss"]),
            }
        )
    return rows


def markdown(results: list[dict[str, Any]]) -> str:
    """Render the results (and the degree-P vs degree-1 comparison) as markdown tables.

    Args:
        results: Combined results merged over rounds.

    Returns:
        The tables.
    """
    mib = 1024**2
    lines = [
        "| seq | cp | median step s (min-max) | CPU s/step, all ranks | steps | tokens/s "
        "| peak mem MiB per rank (over model) | halo KiB/layer/step: fwd + bwd = total | = formula "
        "| ring KiB/layer/step (formula) | grad all-reduce MiB/step | loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        degree = r["context_parallel_degree"]
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {degree} | error: {r['error']} |" + " |" * 9)
            continue
        per_rank = r.get("per_rank_peak_mem_over_model_bytes") or []
        mem = " / ".join(f"{m / mib:.0f}" if m else "n/a" for m in per_rank) or "n/a"
        halo = r["halo_bytes_per_layer"]
        if degree > 1:
            traffic = (
                f"{halo['forward'] / 1024:.0f} + {halo['backward'] / 1024:.0f}"
                + (f" + {halo['mask'] / 1024:.0f} (mask)" if halo["mask"] else "")
                + f" = {halo['total'] / 1024:.0f}"
            )
            check = "yes" if r["halo_matches_formula"] else f"NO ({r['halo_formula_bytes'] / 1024:.0f})"
            ring = f"{r['ring_formula_bytes'] / 1024:.0f}"
        else:
            traffic, check, ring = "0", "yes" if halo["total"] == 0 else "NO", "0"
        lines.append(
            f"| {r['seq_len']} | {degree} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) "
            f"| {r['median_cpu_s']:.3f} | {len(r['step_s'])} | {r['tokens_per_s']:.0f} | {mem} "
            f"| {traffic} | {check} | {ring} | {r['grad_allreduce_bytes'] / mib:.2f} | {r['loss']:.6f} |"
        )
    rows = comparisons(results)
    if rows:
        lines += [
            "",
            "| seq | cp | step-time speedup over cp=1 | CPU time cp/cp=1 | peak mem per rank cp/cp=1 "
            "| loss rel. diff |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for q in rows:
            mem = f"{q['mem_ratio']:.2f}x" if q["mem_ratio"] is not None else "n/a"
            lines.append(
                f"| {q['seq_len']} | {q['degree']} | {q['speedup']:.2f}x | {q['cpu_ratio']:.2f}x | {mem} "
                f"| {q['loss_rel_diff']:.1e} |"
            )
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks --context-parallel P", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--context-parallel", type=int, default=2, metavar="P", help="degree compared with 1 (default 2)"
    )
    add_step_arguments(
        parser,
        unit="run",
        rounds_help="interleaved sweeps (cp=1 and cp=P), each in fresh processes",
        seq_help="whole-sequence lengths (default: 256 tiny, 8192)",
    )
    parser.add_argument("--case-timeout", type=float, default=None, help="seconds per run (all ranks)")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    resolve_step_arguments(parser, args)
    if args.device == "cuda" and torch.cuda.device_count() < args.context_parallel:
        parser.error(
            f"--context-parallel {args.context_parallel} needs as many GPUs; "
            f"found {torch.cuda.device_count()}"
        )
    if args.context_parallel < 2:
        parser.error(f"--context-parallel must be >= 2 (it is compared with 1), got {args.context_parallel}")
    for seq_len in args.seq_lens:
        try:
            check_context_parallel(seq_len, args.context_parallel, _group_size(seq_len))
        except LongLoRAConfigError as e:
            parser.error(f"--seq-lens {seq_len}: {e}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the context-parallel comparison (or, with the worker flag, one rank of it).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The combined results, merged over rounds (empty for a worker).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [_WORKER_FLAG]:
        _worker(argv[1])
        return []
    args = _parse(argv)
    runs = [
        (
            Case(
                shape=args.shape,
                layers=args.layers,
                seq_len=seq_len,
                batch_size=args.batch_size,
                variant="longlora",
                device=args.device,
                dtype=args.dtype,
                repeats=args.repeats,
                threads=args.threads,
                activation_checkpointing=args.activation_checkpointing,
                loss_chunks=args.loss_chunks,
            ),
            degree,
        )
        for seq_len in args.seq_lens
        for degree in (1, args.context_parallel)
    ]
    measured: dict[tuple[Case, int], list[dict[str, Any]]] = {run: [] for run in runs}

    def summarise() -> list[dict[str, Any]]:
        return [_merge(rounds) for rounds in measured.values() if rounds]

    for round_index in range(args.rounds):
        for case, degree in runs:
            result = launch(case, degree, args.case_timeout)
            measured[(case, degree)].append(result)
            status = result.get("error") or f"median {result['median_s']:.3f} s"
            print(
                f"[round {round_index + 1}/{args.rounds}] cp={degree} seq {case.seq_len}: {status}",
                file=sys.stderr,
                flush=True,
            )
            if args.out:  # after every run, so a sweep stopped by a time limit keeps what it measured
                results = summarise()
                payload = {
                    "command": "python -m benchmarks " + " ".join(argv),
                    "host": platform.node(),
                    "cpu_count": os.cpu_count(),
                    "torch": torch.__version__,
                    "complete": all(len(r) == args.rounds for r in measured.values()),
                    "results": results,
                    "comparisons": comparisons(results),
                }
                atomic_write_json(args.out, payload, default=str)
    results = summarise()
    print(markdown(results))
    return results


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()) else 0)
