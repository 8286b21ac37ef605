"""The narrow-head attention kernel against torch's fused CPU attention, forward and
backward, one sequence of each length at ESM-2's head shapes.

Inputs in fp32 and in bf16 (training under bf16 autocast). torch's kernel computes in
fp32 (the protein backbone's setting: it runs these heads faster in fp32 than in
bf16), from contiguous fp32 copies made outside the timing; the narrow kernel reads
the model's token-major views in their dtype (bf16: bf16-pair products where the CPU
has AVX512-BF16). Printed: milliseconds per call (median of --repeats), the speed-up,
and the largest difference from torch's results.

    python benchmarks/narrow_attention_speed.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peftlab.shared import narrow_attention

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

HEADS = 20  # every ESM-2 up to 650M has 20 heads; their widths: narrow_attention.HEAD_WIDTHS


def milliseconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(width: int, heads: int, length: int, dtype: torch.dtype, repeats: int, generator: torch.Generator) -> str:
    """One table row: both kernels on one sequence of `length` tokens."""
    q, k, v, grad = (torch.randn(1, length, heads, width, generator=generator).to(dtype).transpose(1, 2)
                     for _ in range(4))
    spans = torch.tensor([(0, 0, length)])
    contiguous = [t.float().contiguous() for t in (q, k, v, grad)]
    reference, logsumexp = _flash(*contiguous[:3])
    out, narrow_logsumexp = narrow_attention.forward(q, k, v, spans)
    reference_grads = _flash_backward(contiguous[3], *contiguous[:3], reference, logsumexp, 0.0, False)
    grads = narrow_attention.backward(grad, q, k, v, out, narrow_logsumexp, spans)
    difference = max((a.float() - b).abs().max().item() for a, b in zip((out, *grads), (reference, *reference_grads)))
    torch_forward = milliseconds(lambda: _flash(*contiguous[:3]), repeats)
    narrow_forward = milliseconds(lambda: narrow_attention.forward(q, k, v, spans), repeats)
    torch_backward = milliseconds(
        lambda: _flash_backward(contiguous[3], *contiguous[:3], reference, logsumexp, 0.0, False), repeats)
    narrow_backward = milliseconds(lambda: narrow_attention.backward(grad, q, k, v, out, narrow_logsumexp, spans),
                                   repeats)
    return (f"| {str(dtype).removeprefix('torch.')} | {width} x {heads} | {length} | {torch_forward:.2f} | {narrow_forward:.2f} | "
            f"{torch_forward / narrow_forward:.2f}x | {torch_backward:.2f} | {narrow_backward:.2f} | "
            f"{torch_backward / narrow_backward:.2f}x | {difference:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 300, 1000])
    args = parser.parse_args()
    if not narrow_attention.load():
        raise SystemExit("the kernel could not be built here (see the message above)")
    print(f"{torch.get_num_threads()} threads")
    print("| inputs | head width x heads | tokens | torch fwd ms | narrow fwd ms | fwd speed-up | torch bwd ms | "
          "narrow bwd ms | bwd speed-up | max difference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for width in narrow_attention.HEAD_WIDTHS:
            for length in args.lengths:
                print(measure(width, HEADS, length, dtype, args.repeats, generator), flush=True)


if __name__ == "__main__":
    main()
