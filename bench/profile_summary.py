"""Where a profiled step's device time goes: reads a jax.profiler trace (NAME.xplane.pb[.gz]) and the
compiled HLO beside it (NAME.hlo.txt.gz, both written by `bench/gpu_train_step.py --profile`) and
prints the device time by kind of op, by the Python source that emitted it, and the top ops.

    python bench/profile_summary.py --trace=DIR/full_ft8_cudnn_dots.xplane.pb.gz [--top 30]

Kernels are matched to HLO instructions by the `hlo_op` stat XLA attaches to each of them (or, in
a CUDA graph, by the kernel's name, which for XLA's own fusions is the fusion's with "." made "_");
the
instruction's text says what it is (a cuBLAS or Triton GEMM, cuDNN attention, a scatter, an
elementwise or reduction fusion) and its metadata which source line emitted it (optax's files for
the optimiser, the model's for the layers). Reading the xplane needs only jax (ProfileData), so
this runs on a CPU machine over a GPU's trace.
"""
from __future__ import annotations

import collections
import gzip
import os
import re
import sys

from absl import flags

from owl_jax import cli

INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def read_hlo(path: str) -> tuple[dict[str, str], dict[int, str]]:
    """(instruction name -> its line across every computation, stack frame id -> "dir/file:line" of
    the innermost Python frame that emitted it), from the module's text with its frame tables."""
    opener = gzip.open if path.endswith(".gz") else open
    lines, tables, table = {}, collections.defaultdict(dict), None
    with opener(path, "rt") as f:
        for line in f:
            if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                table = line.strip()
                continue
            if table and re.match(r"^\d+ ", line):
                key, value = line.split(" ", 1)
                tables[table][int(key)] = value.strip()
                continue
            table = None
            m = INSTRUCTION.match(line)
            if m:
                lines.setdefault(m.group(1), line)
                # Kernel names are the fusion's with "." and "-" made "_" (loop_add_fusion.9 ->
                # loop_add_fusion_9): inside a CUDA graph that name is the only key there is.
                lines.setdefault(re.sub(r"[.\-]", "_", m.group(1)), line)
    frames = {}
    for frame_id, frame in tables["StackFrames"].items():
        location = tables["FileLocations"].get(int(re.search(r"file_location_id=(\d+)", frame).group(1)), "")
        file_id, line_no = re.search(r"file_name_id=(\d+)", location), re.search(r"\bline=(\d+)", location)
        if file_id:
            name = tables["FileNames"].get(int(file_id.group(1)), "?").strip('"')
            frames[frame_id] = "/".join(name.split("/")[-2:]) + (f":{line_no.group(1)}" if line_no else "")
    return lines, frames


def kind_of(line: str | None, kernel: str) -> str:
    text, name = line or "", kernel.lower()
    if "__cudnn$fmha" in text or "cudnn" in name or "sdpa" in name or "fmha" in name:
        return "attention (cuDNN)"
    if "__cublas" in text or name.startswith(("nvjet", "sm90_xmma", "cutlass")) or "cublas" in name:
        return "GEMM (cuBLAS)"
    if "__triton_gemm" in text or name.startswith("gemm_fusion"):
        return "GEMM (Triton)"
    if "ynn_fusion" in name or " dot(" in text:  # the CPU's GEMMs (YNNPACK), or an unfused dot
        return "GEMM (other)"
    if "__triton" in text:
        return "Triton fusion (other)"
    if " scatter(" in text or "scatter" in name:
        return "scatter"
    if " dynamic-update-slice(" in text or "dynamic_update_slice" in name:
        return "dynamic-update-slice"
    if "memcpy" in name or "memset" in name or " copy(" in text:
        return "copy / memset"
    if "kind=kInput" in text or name.startswith("input_") or "reduce" in name:
        return "reduction fusion"
    if "kind=kLoop" in text or "fusion" in name:
        return "elementwise fusion"
    return "other"


def source_of(line: str | None, frames: dict[int, str]) -> str:
    m = re.search(r"stack_frame_id=(\d+)", line or "")
    if m:
        return frames.get(int(m.group(1)), "?")
    m = re.search(r'source_file="([^"]+)"(?:\s+source_line=(\d+))?', line or "")  # older XLA text
    if not m:
        return "?"
    return "/".join(m.group(1).split("/")[-2:]) + (f":{m.group(2)}" if m.group(2) else "")


def device_events(xplane: str):
    """(kernel name, hlo_op or None, duration ns) of every event on the device planes' lines."""
    from jax.profiler import ProfileData

    if xplane.endswith(".gz"):
        with gzip.open(xplane, "rb") as f:
            data = ProfileData.from_serialized_xspace(f.read())
    else:
        data = ProfileData.from_file(xplane)
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    planes = gpu or [p for p in data.planes if p.name == "/host:CPU"]  # a CPU trace: its XLA threads
    for plane in planes:
        lines = list(plane.lines)
        streams = [line for line in lines if line.name.lower().startswith("stream")]
        for line in streams or lines:  # per-stream kernel lines: derived lines would count kernels twice
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if op is None and not gpu:
                    continue
                yield event.name, op, event.duration_ns


def summarise(xplane: str, hlo: str | None, top: int) -> str:
    instructions, frames = read_hlo(hlo) if hlo and os.path.exists(hlo) else ({}, {})
    by_op = collections.defaultdict(lambda: [0.0, 0])
    kernels_of = {}
    for kernel, op, ns in device_events(xplane):
        # Inside a CUDA graph (XLA's command buffers) every kernel carries the graph's name; the
        # kernel's own name (an HLO fusion's, or the library's) is then the better key.
        key = kernel if op is None or op.startswith("command_buffer") else op
        by_op[key][0] += ns
        by_op[key][1] += 1
        kernels_of.setdefault(key, kernel)
    total = sum(ns for ns, _ in by_op.values())
    by_kind, by_source = collections.Counter(), collections.Counter()
    rows = []
    for key, (ns, count) in by_op.items():
        line = instructions.get(key)
        kind, source = kind_of(line, kernels_of[key]), source_of(line, frames)
        by_kind[kind] += ns
        by_source[source.split(":")[0]] += ns
        rows.append((ns, count, key, kind, source))
    out = [f"# {os.path.basename(xplane)}: {total / 1e6:.1f} ms of device time in {sum(c for _, c in by_op.values())} "
           f"kernels ({len(by_op)} distinct ops; HLO {'matched' if instructions else 'not given'})", "",
           "| kind | ms | share |", "|---|---|---|"]
    out += [f"| {k} | {ns / 1e6:.1f} | {ns / total:.1%} |" for k, ns in by_kind.most_common()]
    out += ["", "| source file | ms | share |", "|---|---|---|"]
    out += [f"| {k} | {ns / 1e6:.1f} | {ns / total:.1%} |" for k, ns in by_source.most_common(15)]
    out += ["", "| op | kernels | ms | share | kind | source |", "|---|---|---|---|---|---|"]
    for ns, count, key, kind, source in sorted(rows, reverse=True)[:top]:
        out.append(f"| {key} | {count} | {ns / 1e6:.2f} | {ns / total:.1%} | {kind} | {source} |")
    return "\n".join(out)


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("trace", None, "the profiled step's device trace, NAME.xplane.pb[.gz]", flag_values=fv)
    flags.DEFINE_string("hlo", None, "default: NAME.hlo.txt.gz beside NAME.xplane.pb[.gz]", flag_values=fv)
    flags.DEFINE_integer("top", 30, "ops listed, longest first", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = cli.parse_flags(argv, _flags(), __doc__, required=("trace",))
    hlo = args.hlo or re.sub(r"\.xplane\.pb(\.gz)?$", ".hlo.txt.gz", args.trace)
    print(summarise(args.trace, hlo, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
