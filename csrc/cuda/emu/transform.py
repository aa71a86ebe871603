"""Rewrites a kernel source for the CPU emulator: emu.h first, dynamic shared memory
from emu::dyn_smem, `k<<<grid, block, smem, stream>>>(args)` as emu::launch(...), a
__launch_bounds__ check at the start of each kernel. The inline-PTX
helpers of mma.cuh are swapped for emu_mma.h's by -DLDMFAST_EMU (run.sh)."""
import os, re, sys, zlib
src = open(sys.argv[1]).read()
src = '#include "emu.h"\n' + src
src = re.sub(r'extern __shared__ (\w+) (\w+)\[\];', r'\1* \2 = emu::dyn_smem<\1>();', src)
# Static __shared__ variables: one instance per CTA, in the CTA's arena.
counter = iter(range(1, 1 << 30))
src = re.sub(r'__shared__ ([\w:]+) (\w+)((?:\[[^\]]+\])*);',
             lambda m: f'auto& {m.group(2)} = emu::shared_var<{m.group(1)}{m.group(3)}>({next(counter) + zlib.crc32(os.path.basename(sys.argv[1]).encode()) % 100000 * 1000});', src)
# The sm_90 cluster code runs too: the emulator provides clusters.
src = src.replace('defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900', '1')
src = src.replace('cudaLaunchKernelEx(&cfg,', 'emu::launch_ex(&cfg,')
def launch(m):
    k, cfg, args = m.group(1), m.group(2), m.group(3)
    # split top-level commas of the launch config
    depth, cur, parts = 0, '', []
    for ch in cfg:
        if ch in '(<': depth += 1
        if ch in ')>': depth -= 1
        if ch == ',' and depth == 0: parts.append(cur.strip()); cur = ''
        else: cur += ch
    parts.append(cur.strip())
    while len(parts) < 4: parts.append('0' if len(parts) == 2 else 'nullptr')
    return f'emu::launch({k}, dim3({parts[0]}), dim3({parts[1]}), {parts[2]}, {parts[3]}, {args});'
src = re.sub(r'(\b[\w:]+(?:<[^;<>]*>)?)\s*<<<(.+?)>>>\((.*?)\);', launch, src, flags=re.S)
# __launch_bounds__(N) or (N, min blocks), N a name or a variable template's instance: a launch of more threads fails on a GPU, so each kernel definition's body
# starts with emu::check_launch_bounds(N) (declarations are left alone).
def bounds(src):
    out, pos = [], 0
    for m in re.finditer(r'__launch_bounds__\(([\w:]+(?:<[\w:, ]*>)?)(?:,\s*\w+)?\)', src):
        i = src.index('(', m.end())  # the parameter list
        depth, j = 0, i
        while True:
            depth += {'(': 1, ')': -1}.get(src[j], 0)
            if depth == 0: break
            j += 1
        k = j + 1
        while src[k].isspace(): k += 1
        if src[k] == '{':
            out.append(src[pos:k + 1] + f' emu::check_launch_bounds({m.group(1)});')
            pos = k + 1
    return ''.join(out) + src[pos:]
src = bounds(src)
open(sys.argv[2], 'w').write(src)
