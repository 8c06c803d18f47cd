"""GPU evidence in one short run (issue 20): the bundle check, which SDPA kernel runs, training throughput and MFU of
the L6 perceiver_mlm vs the shape-matched BertForMaskedLM at N = 512 … 8192, encoder scaling to N = 32k, a short
pretraining run that leaves a normal run record, and torch.compile on/off at the shortest and longest N.

Run by `benchmarks/gpu_run.sh` (which installs the carried wheels first); `--dry-run` does every step on the CPU at
tiny sizes. Each section writes `<out>/<section>.json` and `.md` as soon as it finishes, so a timeout still leaves
data."""
from __future__ import annotations
import argparse, json, re, sys, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path: sys.path.insert(0, p)

import torch
from bench import ENCODER_COLUMNS, GPU_COLUMNS, encoder_bench, gpu_bench
from harness import format_table, machine_info, write_json

PEAK_BF16 = 989.5          # H100 SXM / H200 datasheet dense bf16 TFLOP/s
MEASURED_BF16 = 790.       # an 8192³ bf16 matmul on this project's H200 (KINDS.md: 769-798 TFLOP/s)
NEVER_CARRY = ('torch', 'transformers', 'accelerate', 'wandb')   # the image's own builds; wandb stays disabled
SECTIONS = ('bundle', 'sdpa', 'throughput', 'encoder', 'pretrain', 'compile')


def _norm(name:str) -> str: return re.sub(r'[-_.]+', '-', name).lower()

def image_packages(kinds_md) -> dict:
    "Normalised package name -> version (None where KINDS.md lists only the name) of the GPU image."
    text = Path(kinds_md).read_text()
    names = re.search(r"Packages: ([^\n]+?)\.\s*$", text, re.M)
    if not names: raise ValueError(f"{kinds_md}: no 'Packages: ...' list of the GPU image")
    pk = {_norm(n): None for n in names.group(1).split(', ')}
    seen = re.search(r"filtered by the names it asked for: ([^|]+)\|", text)
    for item in (seen.group(1).strip().split(', ') if seen else []):
        name, ver = item.rsplit(' ', 1); pk[_norm(name)] = ver
    return pk

def read_manifest(path) -> dict:
    "name==version lines (comments and blanks skipped) -> {normalised name: version}."
    lines = [l.split('#')[0].strip() for l in Path(path).read_text().splitlines()]
    return {_norm(n): v for n, v in (l.split('==') for l in lines if l)}

def wheel_versions(wheels_dir) -> dict:
    "{normalised name: version} of the wheels in a folder (empty if there is none)."
    d = Path(wheels_dir)
    return {_norm(w.name.split('-')[0]): w.name.split('-')[1] for w in sorted(d.glob('*.whl'))} if d.is_dir() else {}

def check_bundle(manifest, wheels_dir, kinds_md) -> dict:
    "The bundle's names and versions against the manifest and the GPU image's package list; `ok` False on a conflict."
    want, have = read_manifest(manifest), wheel_versions(wheels_dir)
    image = image_packages(kinds_md) if Path(kinds_md).is_file() else None
    rows, problems = [], []
    for name, ver in want.items():
        in_image = None if image is None else image.get(name, 'absent')
        rows.append(dict(package=name, version=ver, wheel=have.get(name), image=in_image or 'listed, version unknown'))
        if name in NEVER_CARRY: problems.append(f"{name}: never carried (the GPU image's own build is used)")
        if have and have.get(name) != ver: problems.append(f"{name}: wheel {have.get(name)} != manifest {ver}")
        if in_image == ver: problems.append(f"{name}: {ver} is already in the image; do not carry it")
    problems += [f"{n}: wheel not in the manifest" for n in have if n not in want]
    return dict(ok=not problems, problems=problems, rows=rows, kinds_md=str(kinds_md) if image else None,
                wheels_checked=bool(have))


def sdpa_backend(device, dtype) -> dict:
    "Which scaled-dot-product-attention kernel a default call runs here (from the profiler's operator names)."
    from torch.profiler import ProfilerActivity, profile
    q = torch.randn(2, 8, 256, 64, device=device, dtype=dtype)   # (B, heads, N, head dim)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=acts) as p: torch.nn.functional.scaled_dot_product_attention(q, q, q)
    ops = sorted({e.key for e in p.key_averages() if 'scaled_dot_product' in e.key or 'attention' in e.key.lower()})
    kinds = [k for k in ('cudnn', 'flash', 'efficient', 'math') if any(k in o for o in ops)]
    return dict(backend=kinds[0] if kinds else 'unknown', ops=ops, device=str(device), dtype=str(dtype))


def _mfu_rows(res, N, compile_):
    out = []
    for r in res['rows']:
        tf = r['achieved_tflops']
        out.append(dict(r, N=N, compile=compile_, mfu=tf / PEAK_BF16, mfu_of_measured=tf / MEASURED_BF16))
    return out

def throughput(dev, dry, Ns, compile_:bool|str=False) -> list[dict]:
    "perceiver_mlm vs bert_mlm training steps at each N (32k tokens per step on the GPU), MFU vs 989.5 and vs 790."
    rows = []
    for N in Ns:
        res = gpu_bench(models=('perceiver_mlm', 'bert_mlm'), shape='tiny' if dry else 'l6', seq_len=N,
                        batch=max(1, (128 if dry else 32768) // N), steps=1 if dry else 10, reps=1 if dry else 3,
                        warmup=1 if dry else 3, device=str(dev), dtype='fp32' if dry else 'bf16', compile=compile_,
                        progress=not dry)
        rows += _mfu_rows(res, N, compile_)
    return rows

THROUGHPUT_COLUMNS = (['N', 'compile'] + GPU_COLUMNS[:6] + [('mfu_of_measured', 'MFU vs 790', '{:.1%}')]
                      + GPU_COLUMNS[6:9] + [('share_of_ideal', 'share of ideal', '{:.0%}')] + GPU_COLUMNS[9:])


def pretrain(dev, dry, runs_dir) -> dict:
    "A short pretraining run of the L6 perceiver_mlm through `run_pretraining` (the script path), leaving a run record."
    from concept_nb.train import run_pretraining
    big = dict(hidden_size=512, concept_num=128, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
               block_size=512, batch_size=64, epochs=2.0, steps=1, lr=3e-4, warmup_steps=20, schedule='linear',
               eval_every=1000, eval_batches=4, save_every=0, keep_checkpoints=1, log_every=10,
               mixed_precision='bf16', max_docs=0, num_workers=2, cpu_threads=0)
    tiny = dict(steps=4, eval_every=4, eval_batches=1, save_every=0, log_every=2, max_docs=40, block_size=64)
    p = dict(run_name='gpu-l6-perceiver-mlm' + ('-dry' if dry else ''), model_type='perceiver_mlm', objective='mlm',
             data='embedded', tokenizer='embedded', concept_losses='none', loss_weight=0.0, device=dev.type,
             wandb_mode='disabled', progress=False, **(tiny if dry else big))
    t0 = time.time()
    m = run_pretraining(p, runs_dir=runs_dir, log=(lambda *a: None) if dry else print)
    return dict(m, wall_with_setup_s=round(time.time() - t0, 1), steady_tokens_per_s=steady_throughput(m), params=p)

def steady_throughput(metrics:dict) -> float|None:
    "Tokens/s between the second and the last logged training rows (the first one includes warm-up and compilation)."
    hist = Path(metrics.get('run_dir', '.')) / 'history.jsonl'   # schema-2 record: run_dir at the top level
    rows = [r for r in map(json.loads, hist.read_text().splitlines()) if 'tokens' in r and 'train_s' in r] \
        if hist.is_file() else []
    if len(rows) < 3 or rows[-1]['train_s'] <= rows[1]['train_s']: return None
    return (rows[-1]['tokens'] - rows[1]['tokens']) / (rows[-1]['train_s'] - rows[1]['train_s'])


def format_bundle(r:dict) -> str:
    table = format_table(r['rows'], ['package', 'version', 'wheel', 'image'])
    return table + '\n\n' + ('bundle OK' if r['ok'] else 'BUNDLE PROBLEMS: ' + '; '.join(r['problems']))

def _write(out:Path, name:str, obj, table:str|None=None):
    write_json(out / f"{name}.json", obj)
    md = f"## {name}\n\n" + (table if table is not None else '```\n' + json.dumps(obj, indent=1, default=str) + '\n```')
    (out / f"{name}.md").write_text(md + '\n')
    print(md, flush=True)

def run_sections(out:Path, dry:bool, manifest, wheels_dir, kinds_md, budget_s:float) -> dict:
    "Every section in turn, each written when done; a failing or over-budget section is recorded and the rest go on."
    dev, t0, status = torch.device('cpu' if dry else 'cuda'), time.time(), {}
    if not dry: torch.set_float32_matmul_precision('high')
    Ns = (32, 64) if dry else (512, 2048, 4096, 8192)
    steps = dict(
        bundle=lambda: check_bundle(manifest, wheels_dir, kinds_md),
        sdpa=lambda: sdpa_backend(dev, torch.float32 if dry else torch.bfloat16),
        throughput=lambda: throughput(dev, dry, Ns),
        encoder=lambda: encoder_bench(seq_lens=Ns if dry else (512, 2048, 8192, 16384, 32768),
                                      tokens=64 if dry else 32768, shape='tiny' if dry else 'l6', modes=('concept',),
                                      reps=1 if dry else 3, reps_large=None, device=str(dev), progress=not dry),
        pretrain=lambda: pretrain(dev, dry, out / 'runs'),
        # the dry run traces with the 'eager' backend: inductor would need a C++ compiler and minutes on a CPU
        compile=lambda: throughput(dev, dry, Ns[:1] if dry else (Ns[0], Ns[-1]), 'eager' if dry else True))
    tables = dict(throughput=lambda r: format_table(r, THROUGHPUT_COLUMNS),
                  compile=lambda r: format_table(r, THROUGHPUT_COLUMNS),
                  encoder=lambda r: format_table(r['rows'], ENCODER_COLUMNS),
                  bundle=format_bundle)
    _write(out, 'machine', machine_info(str(dev)))
    for name, fn in steps.items():
        if time.time() - t0 > budget_s:
            status[name] = 'skipped: time budget spent'; continue
        s0 = time.time()
        try:
            res = fn()
            _write(out, name, res, tables[name](res) if name in tables else None)
            status[name] = 'ok' if name != 'bundle' or res['ok'] else 'problems'
        except Exception as e:   # noqa: BLE001 - one broken section must not cost the others' data
            status[name] = f"failed: {type(e).__name__}: {e}"
            (out / f"{name}.error.txt").write_text(traceback.format_exc())
        print(f"[{name}] {status[name]} in {time.time() - s0:.1f} s", flush=True)
    summary = dict(status=status, wall_s=round(time.time() - t0, 1), dry_run=dry)
    _write(out, 'summary', summary)
    return summary

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python benchmarks/gpu_run.py', description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', required=True, help='results folder (created)')
    ap.add_argument('--dry-run', action='store_true', help='every section on the CPU at tiny sizes')
    ap.add_argument('--manifest', default=str(ROOT / 'benchmarks' / 'gpu_wheels.txt'))
    ap.add_argument('--wheels', default=str(ROOT / '.gpu_bundle' / 'wheels'))
    ap.add_argument('--kinds', default='/work/.library/device/KINDS.md', help="the GPU image's package list")
    ap.add_argument('--budget-s', type=float, default=270., help='start no section after this many seconds')
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available(): raise SystemExit("error: no CUDA here; use --dry-run on a CPU")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    s = run_sections(out, a.dry_run, a.manifest, a.wheels, a.kinds, a.budget_s)
    return 0 if all(v == 'ok' for v in s['status'].values()) else 1

if __name__ == '__main__': raise SystemExit(main())
