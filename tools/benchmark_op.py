"""Times multi-scale deformable attention, forward and backward, per implementation, and
measures its peak memory; prints a markdown table.

    python tools/benchmark_op.py                         # CPU, float32, encoder and decoder, batch 2 and 8
    python tools/benchmark_op.py --device cuda --dtype float16 --batch 2 --workloads encoder
    python tools/benchmark_op.py --device cuda --value-dtype bfloat16 --implementations kernel triton --json op.json

Workloads (Deformable DETR, 8 heads x 32 channels, 4 levels x 4 points):
    encoder  levels 100x134, 50x67, 25x34, 13x17 (17,821 tokens), one query per token,
             reference points at the token centres
    decoder  the same value, 300 queries with uniform reference points
    dropout  not this op: the transformer's dropout (p = 0.1) on the encoder's feed-forward
             activations (17,821 tokens x 1024), deformable_detr_ops.dropout ("kernel") against
             torch.nn.functional.dropout ("reference")
Sampling locations are the reference point plus Gaussian offsets of --spread pixels of each
level (how a trained model samples); --spread 0 draws them uniformly in [0, 1] instead.

``--value-dtype`` gives the value its own dtype: ``--value-dtype bfloat16`` with the default
float32 is what autocast passes the op (a bfloat16 projection, float32 locations and weights).

Each (workload, batch, implementation) runs in a fresh process. Peak memory is the rise
over the memory held once the inputs exist, during one forward + backward: on CUDA
torch.cuda.max_memory_allocated; on the CPU the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs, with glibc returning large blocks at once).
Times are medians over --repeats runs after one warm-up run: on the CPU wall time around each
call; on CUDA device time between CUDA events recorded around each forward and backward, with
no synchronization inside the loop. ``--json PATH`` also writes every row.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEVELS = [(100, 134), (50, 67), (25, 34), (13, 17)]
HEADS, CHANNELS, POINTS = 8, 32, 4
DECODER_QUERIES = 300
IMPLEMENTATIONS = ("reference", "kernel", "triton")
FFN_CHANNELS, DROPOUT = 1024, 0.1


# ---------------------------------------------------------------- worker (one measurement per process)

def _status_kilobytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss():
    """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _make_workload(spec):
    import torch

    from deformable_detr_ops.testing import make_inputs, token_centres

    shapes = torch.tensor(LEVELS)
    tokens = int(shapes.prod(1).sum())
    if spec["workload"] == "dropout":
        generator = torch.Generator(device=spec["device"]).manual_seed(0)
        options = dict(dtype=getattr(torch, spec["dtype"]), device=spec["device"], generator=generator)
        activations = torch.randn(spec["batch"], tokens, FFN_CHANNELS, **options)
        return [activations.requires_grad_()], torch.randn(activations.shape, **options)
    if spec["workload"] == "encoder":
        queries, reference_points = tokens, token_centres(shapes)
    else:
        queries, reference_points = DECODER_QUERIES, None
    inputs = make_inputs(shapes, batch=spec["batch"], heads=HEADS, channels=CHANNELS, queries=queries, points=POINTS,
                         dtype=getattr(torch, spec["dtype"]), device=spec["device"],
                         reference_points=reference_points, spread=spec["spread"] or None, seed=0)
    value, shapes, starts, locations, weights = inputs
    value = value.to(getattr(torch, spec.get("value_dtype") or spec["dtype"]))
    grad_output = torch.randn(value.shape[0], queries, HEADS * CHANNELS, dtype=value.dtype, device=value.device)
    return [value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_()], grad_output


def _worker(spec):
    import gc

    import torch

    import deformable_detr_ops as ops
    from deformable_detr_ops.hash_dropout import kernel_loaded

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    inputs, grad_output = _make_workload(spec)
    implementation = spec["implementation"]
    if spec["workload"] == "dropout":
        if implementation == "kernel" and not (kernel_loaded() and spec["device"] == "cpu"):
            return {"error": f"no kernel ({ops.library_error() or 'CPU only, or a build from before it'})"}
    elif implementation == "kernel" and not ops.kernel_available(spec["device"], torch.promote_types(inputs[0].dtype, inputs[3].dtype)):
        return {"error": f"no kernel ({ops.library_error() or 'not built for this device or dtype'})"}
    elif implementation == "triton" and not ops.triton_available(spec["device"]):
        return {"error": "Triton cannot run here (a GPU, or TRITON_INTERPRET=1 on the CPU)"}

    def forward():
        if spec["workload"] == "dropout":
            if implementation == "kernel":
                return ops.dropout(inputs[0], DROPOUT)
            return torch.nn.functional.dropout(inputs[0], DROPOUT, True)
        return ops.ms_deform_attn(*inputs, implementation=implementation)

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    def clear_grads():
        for tensor in inputs:
            tensor.grad = None

    # Peak memory of the first forward + backward of a fresh process.
    gc.collect()
    synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        if not _reset_peak_rss():
            return {"error": "cannot reset the peak RSS (/proc/self/clear_refs)"}
        baseline = _status_kilobytes("VmRSS") * 1024
    forward().backward(grad_output)
    synchronize()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _status_kilobytes("VmHWM") * 1024 - baseline
    clear_grads()

    if cuda:
        forward_ms, backward_ms = _cuda_event_times(forward, grad_output, clear_grads, spec["repeats"])
    else:
        forward_ms, backward_ms = _wall_times(forward, grad_output, clear_grads, spec["repeats"])
    return {
        "forward_ms": statistics.median(forward_ms),
        "backward_ms": statistics.median(backward_ms),
        "peak_mb": peak / 2**20,
        "threads": torch.get_num_threads(),
        "timing": "cuda events" if cuda else "wall",
    }


def _wall_times(forward, grad_output, clear_grads, repeats):
    """Milliseconds of each forward and backward after one warm-up run, by the wall clock."""
    forward_ms, backward_ms = [], []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        output = forward()
        middle = time.perf_counter()
        output.backward(grad_output)
        end = time.perf_counter()
        del output
        clear_grads()
        if repeat > 0:  # the first run warms up caches and allocators
            forward_ms.append(1e3 * (middle - start))
            backward_ms.append(1e3 * (end - middle))
    return forward_ms, backward_ms


def _cuda_event_times(forward, grad_output, clear_grads, repeats):
    """Device milliseconds of each forward and backward after one warm-up run: CUDA events around
    each, read after one synchronization at the end, so the host never waits inside the loop."""
    import torch

    output = forward()  # warm-up: compilation (Triton), allocator
    output.backward(grad_output)
    del output
    clear_grads()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(repeats)]
    for start, middle, end in events:
        start.record()
        output = forward()
        middle.record()
        output.backward(grad_output)
        end.record()
        del output
        clear_grads()
    torch.cuda.synchronize()
    return ([start.elapsed_time(middle) for start, middle, _ in events],
            [middle.elapsed_time(end) for _, middle, end in events])


# ---------------------------------------------------------------- driver

def _write_json(path, content):
    """Writes ``content`` to ``path`` through a temporary file, so a reader never sees half of it."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(temporary, path)


def _measure(spec):
    """Runs one measurement in a fresh interpreter and returns its result dictionary."""
    environment = dict(os.environ)
    # Large blocks go straight back to the system when freed, so that the resident set
    # follows the memory in use (glibc otherwise keeps freed blocks up to 32 MiB).
    environment.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def _format_row(spec, result, baseline):
    name = f"{spec['implementation']} ({spec['device']})"
    prefix = f"| {spec['workload']} | {spec['batch']} | {name} |"
    if "error" in result:
        return f"{prefix} - | - | - | - | - | - | {result['error']} |"
    total = result["forward_ms"] + result["backward_ms"]
    if baseline and "error" not in baseline:
        speedups = (
            baseline["forward_ms"] / result["forward_ms"],
            baseline["backward_ms"] / result["backward_ms"],
            (baseline["forward_ms"] + baseline["backward_ms"]) / total,
        )
        speedup_text = " | ".join(f"{s:.1f}x" for s in speedups)
    else:
        speedup_text = "- | - | -"
    return (f"{prefix} {result['forward_ms']:.1f} | {result['backward_ms']:.1f} | {speedup_text} | "
            f"{result['peak_mb']:.0f} | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="devices to measure (default: cpu, and cuda when a GPU is visible)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--value-dtype", default=None, choices=["float32", "float64", "float16", "bfloat16"],
                        help="the value's dtype when it differs from --dtype (locations and weights)")
    parser.add_argument("--batch", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--workloads", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder", "dropout"])
    parser.add_argument("--implementations", nargs="+", default=None, choices=IMPLEMENTATIONS,
                        help="default: reference and kernel, and triton where it runs (a GPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up run")
    parser.add_argument("--spread", type=float, default=2.0,
                        help="offsets of the sampling locations around the reference points, in pixels "
                             "(0: uniform locations)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    import torch

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    dtypes = args.dtype if args.value_dtype in (None, args.dtype) else f"{args.value_dtype} value, {args.dtype} locations and weights"
    print(f"torch {torch.__version__}, {dtypes}, sampling spread {args.spread} px, "
          f"median of {args.repeats} runs")
    print()
    print("| workload | batch | implementation | forward ms | backward ms | forward speedup | backward speedup "
          "| forward + backward speedup | peak memory MiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for device in devices:
        for workload in args.workloads:
            for batch in args.batch:
                baseline = None
                implementations = args.implementations or ["reference", "kernel"] + (
                    ["triton"] if device == "cuda" and workload != "dropout" else [])
                for implementation in implementations:
                    spec = dict(device=device, dtype=args.dtype, value_dtype=args.value_dtype, batch=batch,
                                workload=workload, implementation=implementation, repeats=args.repeats,
                                spread=args.spread, threads=args.threads)
                    result = _measure(spec)
                    if implementation == "reference":
                        baseline = result
                    print(_format_row(spec, result, baseline), flush=True)
                    rows.append(dict(spec, **result))
                    if args.json:
                        _write_json(args.json, {"torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
