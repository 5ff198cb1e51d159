"""How MLX's CPU backend runs two independent chains of elementwise ops: one after the other, on two threads of
one process, or in two processes at the same time (docs/benchmarks.md, "a step's rows in two parts side by
side"). Each chain is `--ops` multiply-adds on `--size` floats, evaluated every 100 ops, as a training step's
many small ops are. Exploratory: one run is one noisy measurement.

    python scripts/thread_scaling.py --size 4096 --ops 20000
"""

import argparse
import subprocess
import sys
import threading
import time

from mlx_qwen35 import platform  # noqa: F401  (OpenBLAS and our CPU settings before MLX)

import mlx.core as mx


def chain(size: int, ops: int) -> float:
    x = mx.random.normal((size,))
    mx.eval(x)
    start = time.perf_counter()
    for _ in range(max(1, ops // 100)):
        y = x
        for _ in range(100):
            y = y * 1.0001 + 0.5
        mx.eval(y)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="floats in each op")
    parser.add_argument("--ops", type=int, default=20000, help="ops in each chain")
    parser.add_argument("--alone", action="store_true", help="time one chain and print its seconds (the child)")
    args = parser.parse_args(argv)
    if args.alone:
        print(f"{chain(args.size, args.ops):.3f}")
        return 0
    start = time.perf_counter()
    chain(args.size, args.ops)
    chain(args.size, args.ops)
    one_after_other = time.perf_counter() - start
    start = time.perf_counter()
    helper = threading.Thread(target=chain, args=(args.size, args.ops))
    helper.start()
    chain(args.size, args.ops)
    helper.join()
    threads = time.perf_counter() - start
    command = [sys.executable, __file__, "--alone", "--size", str(args.size), "--ops", str(args.ops)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    processes = [float(child.communicate()[0]) for child in children]
    print(f"{args.ops} ops on {args.size} floats, twice: one after the other {one_after_other:.2f} s, on two "
          f"threads {threads:.2f} s, in two processes at once {processes[0]:.2f} and {processes[1]:.2f} s; "
          f"{platform.cpu_setup()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
