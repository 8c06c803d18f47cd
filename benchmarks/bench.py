"""The O(C·N) claim measured: concept encoder vs BERT side by side (time, memory, full training step), packing
efficiency, and GPU throughput / MFU at the upstream L6 shapes.

    python benchmarks/bench.py {encoder,step,packing,gpu,all} [--quick] [--out PATH] [--device D] [--reps R] ...

See benchmarks/README.md for the methodology and the measured tables; the FLOP model is `concept_nb.flops`."""
from __future__ import annotations
import argparse, contextlib, gc, os, statistics, sys, time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):   # this checkout's library and the sibling harness
    if p not in sys.path: sys.path.insert(0, p)

import torch
from concept_nb.flops import STEP_MODELS, Shape, forward_flops, get_shape, peak_tflops
from harness import (MASK, TOLERANCE, add_flags, add_ratios, check_targets, device_of, format_flags, format_table,
                     format_targets, interleaved_times, log, machine_info, make_encoder, make_step_model,
                     memory_method, n_params, peak_memory, step_batch, time_call, torch_threads, write_json)

BENCHMARKS = ('encoder', 'step', 'packing', 'gpu')
MAX_REPS = 15   # CPU default: repetitions at most while a ratio is not yet stable to +-10%


# ---------------------------------------------------------------- one call of a model

def _autocast(device, dtype:str):
    if dtype == 'fp32': return contextlib.nullcontext()
    if dtype != 'bf16': raise ValueError(f"dtype={dtype!r}: expected 'fp32' or 'bf16'")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

def _fwd_bwd(model, ids, mask, device, dtype):
    def run():
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype): h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        h.float().mean().backward()
    return run

def _train_step(model, batch, opt, device, dtype):
    def run():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype): loss = model(**batch).loss
        loss.backward(); opt.step()
    return run

def _optimizer(model, dev):
    kw = dict(fused=True) if dev.type == 'cuda' else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **kw)

def _profile(fn, row_limit:int=12) -> list[dict]:
    "Top operators (self time) of one call of `fn` under torch.profiler."
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as p: fn()
    # on a GPU the kernels' device time is what matters; on a CPU the operators' self time
    t = (lambda e: getattr(e, 'self_device_time_total', 0)) if torch.cuda.is_available() else \
        (lambda e: e.self_cpu_time_total)
    avg = p.key_averages()
    ev, tot = sorted(avg, key=t, reverse=True)[:row_limit], sum(t(e) for e in avg) or 1
    return [dict(op=e.key, self_ms=round(t(e) / 1e3, 2), share=round(t(e) / tot, 3), calls=e.count) for e in ev]

def _median(xs): return statistics.median(xs)

def _reps_at(N, reps, reps_large, large_n): return reps if N < large_n or not reps_large else reps_large


# ---------------------------------------------------------------- encoder scaling

def encoder_bench(seq_lens=(512, 1024, 2048, 4096, 8192), # sequence lengths N
                  tokens:int=8192, # tokens per batch (B = tokens // N, at least 1)
                  shape:Shape|str='cpu', # model shape
                  modes=('concept', 'bixt', 'recursive'), # concept encoder modes compared with BERT
                  reps:int=5, # timed repetitions at least (median)
                  reps_large:int|None=3, # repetitions at least for N >= large_n (None: `reps`), to cap the wall time
                  large_n:int=4096,
                  max_reps:int|None=None, # at most, while a ratio to BERT is not stable to `tol` (None: `reps`)
                  tol:float=TOLERANCE,
                  device:str='auto', dtype:str|None=None, # dtype: 'fp32' (CPU default) or 'bf16' (CUDA default)
                  threads:int|None=None, # torch CPU threads for the run (None: unchanged)
                  memory:bool=True, # measure peak memory (else an unmeasured warm-up)
                  profile:bool=False, # profile each concept mode once at the largest N
                  seed:int=0, progress:bool=True) -> dict:
    "Forward+backward time and peak memory of concept encoders vs `BertModel`, interleaved, one row per (N, model)."
    dev, s, t0 = device_of(device), get_shape(shape), time.time()
    dtype = dtype or ('bf16' if dev.type == 'cuda' else 'fp32')
    with torch_threads(threads):
        torch.manual_seed(seed)
        models = {m: make_encoder(m, s, max(seq_lens)).to(dev).train() for m in ('bert',) + tuple(modes)}
        rows, prof, g = [], {}, torch.Generator().manual_seed(seed)
        for N in seq_lens:
            B = max(1, tokens // N)
            ids = torch.randint(MASK + 1, s.vocab, (B, N), generator=g).to(dev)   # (B, N)
            mask = torch.ones(B, N, dtype=torch.long, device=dev)
            fns = {m: _fwd_bwd(mod, ids, mask, dev, dtype) for m, mod in models.items()}
            gc.collect()
            mem = {m: (peak_memory(fn, dev) if memory else fn()) for m, fn in fns.items()}   # also the warm-up
            times = interleaved_times(fns, _reps_at(N, reps, reps_large, large_n), dev, 'bert', max_reps, tol)
            for m in models:
                rows.append(dict(N=N, batch=B, model=m, time_s=_median(times[m]), times_s=times[m],
                                 peak_mb=mem[m] / 2**20 if mem[m] is not None else None,
                                 flops=3 * B * forward_flops(m, N, s)['total'], params=n_params(models[m])))
            log(progress, f"N={N:>6} B={B:>3} reps={len(times['bert'])} "
                + ' '.join(f"{m} {_median(times[m])*1e3:,.0f} ms" for m in models))
            if profile and N == max(seq_lens): prof = {m: _profile(fns[m]) for m in modes}
        threads_used = torch.get_num_threads()
    add_flags(add_ratios(rows, 'bert'), 'bert', tol=tol)
    settings = dict(seq_lens=list(seq_lens), tokens=tokens, shape=asdict(s), shape_label=s.label(), modes=list(modes),
                    reps=reps, reps_large=reps_large, large_n=large_n, max_reps=max_reps, tolerance=tol,
                    device=str(dev), dtype=dtype, dropout=0.0, torch_threads=threads_used,
                    memory_method=memory_method(dev) if memory else None)
    res = dict(benchmark='encoder', settings=settings, rows=rows, profile=prof, wall_s=round(time.time() - t0, 1))
    res['targets'] = check_targets(res)
    return res

ENCODER_COLUMNS = ['N', 'batch', 'model', ('time_s', 'fwd+bwd s'), ('speedup', 'speed-up ×'),
                   ('ratio_pm', '± (95%)', '±{:.0%}'), ('flop_ratio', 'FLOP ideal ×'),
                   ('share_of_ideal', 'share of ideal', '{:.0%}'), ('peak_mb', 'peak MB', '{:,.0f}'),
                   ('mem_ratio', 'BERT mem / mem'), 'reps', ('spread', 'max/min', '{:.2f}'), 'flags']


# ---------------------------------------------------------------- pretraining step

def step_breakdown(model, batch:dict, opt, device='cpu', dtype:str='fp32', reps:int=3) -> dict:
    "Seconds of the parts of one training step (nested runs timed interleaved): encoder, decoder, head+loss, optimizer."
    ids, mask = batch['input_ids'], batch['attention_mask']
    concept = hasattr(model, 'decode')
    encode = (lambda: model.encoder(ids, mask).last_hidden_state) if concept else \
             (lambda: model.bert(input_ids=ids, attention_mask=mask).last_hidden_state)
    def part(upto):
        def run():
            model.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                if upto == 'loss': out = model(**batch).loss
                else:
                    h = encode()
                    if upto == 'decoder': h = model.decode(h, ids, mask)
                    out = h.float().mean()
            out.backward()
        return run
    fns = dict(encoder=part('encoder'), **({'decoder': part('decoder')} if concept else {}), loss=part('loss'),
               step=_train_step(model, batch, opt, device, dtype))
    t = {k: _median(v) for k, v in interleaved_times(fns, reps, device).items()}
    dec = t['decoder'] - t['encoder'] if concept else 0.
    return dict(encoder=t['encoder'], decoder=dec, head_loss=t['loss'] - t['encoder'] - dec,
                optimizer=t['step'] - t['loss'], step=t['step'])

def _step_row(name, N, B, batch, s, t):
    M = (batch['labels'] != -100).sum().item() / B
    impl = 3 * B * forward_flops(name, N, s, labelled=M if name != 'bert_mlm' else None)['total']
    ideal = 3 * B * forward_flops(name, N, s, labelled=M, decode='labelled')['total'] if name != 'bert_mlm' else impl
    return dict(N=N, batch=B, model=name, real_tokens=B * N, labelled=round(M * B), time_s=_median(t), times_s=t,
                tokens_per_s=B * N / _median(t), flops=impl, flops_ideal=ideal)

def step_bench(plan:dict|None=None, # {N: models}; default: all STEP_MODELS at 512 and 2048, the MLM trio at 4096
               tokens:int=2048, # tokens per step (B = tokens // N, at least 1)
               shape:Shape|str='cpu', reps:int=5, # repetitions at least (median)
               reps_large:int|None=3, # repetitions at least for N >= large_n (None: `reps`)
               large_n:int=4096,
               max_reps:int|None=None, # at most, while a ratio to BERT is not stable to `tol` (None: `reps`)
               tol:float=TOLERANCE, device:str='auto', dtype:str|None=None,
               threads:int|None=None, # torch CPU threads for the run (None: unchanged)
               profile:bool=False, # profile one perceiver_mlm step at the largest N
               seed:int=0, progress:bool=True) -> dict:
    "Real tokens/s of full training steps of the concept models vs `BertForMaskedLM`, interleaved."
    dev, s, t0 = device_of(device), get_shape(shape), time.time()
    dtype = dtype or ('bf16' if dev.type == 'cuda' else 'fp32')
    plan = plan or {512: STEP_MODELS, 2048: STEP_MODELS, 4096: STEP_MODELS[:3]}
    plan = {int(N): tuple(ms) for N, ms in plan.items()}
    for ms in plan.values():
        if 'bert_mlm' not in ms: raise ValueError(f"plan: every N needs 'bert_mlm' as the baseline, got {ms}")
    with torch_threads(threads):
        rows, prof, breakdown = _step_rows(plan, tokens, s, reps, reps_large, large_n, max_reps, tol, dev, dtype,
                                           profile, seed, progress)
        threads_used = torch.get_num_threads()
    add_flags(add_ratios(rows, 'bert_mlm', mem_key=None), 'bert_mlm', tol=tol)
    settings = dict(plan={str(k): list(v) for k, v in plan.items()}, tokens=tokens, shape=asdict(s),
                    shape_label=s.label(), reps=reps, reps_large=reps_large, large_n=large_n, max_reps=max_reps,
                    tolerance=tol, device=str(dev), dtype=dtype, dropout=0.0, torch_threads=threads_used,
                    optimizer='AdamW lr 1e-4 wd 0.01', mlm_probability=0.15, tsdae_deletion=0.6,
                    diffusion_t='evenly spread over [0.3, 1]')
    res = dict(benchmark='step', settings=settings, rows=rows, profile=prof, breakdown=breakdown,
               wall_s=round(time.time() - t0, 1))
    res['targets'] = check_targets(res)
    return res

def _step_rows(plan, tokens, s, reps, reps_large, large_n, max_reps, tol, dev, dtype, profile, seed, progress):
    names = list(dict.fromkeys(m for ms in plan.values() for m in ms))
    torch.manual_seed(seed)
    models = {m: make_step_model(m, s, max(plan)).to(dev).train() for m in names}
    opts = {m: _optimizer(mod, dev) for m, mod in models.items()}
    rows, prof, breakdown = [], {}, []
    for N, ms in plan.items():
        B = max(1, tokens // N)
        batches = {m: {k: v.to(dev) for k, v in step_batch(m, B, N, s.vocab, seed).items()} for m in ms}
        fns = {m: _train_step(models[m], batches[m], opts[m], dev, dtype) for m in ms}
        for fn in fns.values(): fn()                                              # warm-up (allocates Adam state)
        times = interleaved_times(fns, _reps_at(N, reps, reps_large, large_n), dev, 'bert_mlm', max_reps, tol)
        rows += [dict(_step_row(m, N, B, batches[m], s, times[m]), params=n_params(models[m])) for m in ms]
        log(progress, f"N={N:>6} B={B:>3} reps={len(times['bert_mlm'])} "
            + ' '.join(f"{m} {_median(times[m])*1e3:,.0f} ms" for m in ms))
        if profile and N == max(plan):
            if 'perceiver_mlm' in fns: prof = {'perceiver_mlm': _profile(fns['perceiver_mlm'])}
            breakdown += [dict(N=N, model=m, **step_breakdown(models[m], batches[m], opts[m], dev, dtype))
                          for m in ('bert_mlm', 'perceiver_mlm') if m in fns]
    return rows, prof, breakdown

STEP_COLUMNS = ['N', 'batch', 'model', ('time_s', 'step s'), ('tokens_per_s', 'real tok/s'), ('speedup', 'speed-up ×'),
                ('ratio_pm', '± (95%)', '±{:.0%}'), ('flop_ratio', 'FLOP ideal ×'),
                ('flop_ratio_impl', 'FLOP impl ×'), ('share_of_ideal', 'share of ideal', '{:.0%}'), 'reps',
                ('spread', 'max/min', '{:.2f}'), 'flags']


# ---------------------------------------------------------------- packing

def _batch_shares(lengths:list[int], batch:int, width:int|None) -> list[float]:
    "Real share of each batch: sum of lengths / (rows * padded width); width None = pad to the batch's longest."
    out = []
    for i in range(0, len(lengths), batch):
        ls = lengths[i:i + batch]
        out.append(sum(ls) / (len(ls) * (width or max(ls))))
    return out

PACKING_MODES = (('packed', True, 'block'), ('one doc / seq, pad to block (upstream)', False, 'block'),
                 ('one doc / seq, pad to batch max', False, None))

def packing_bench(block_sizes=(128, 512), # sequence lengths
                  batch:int=64, # sequences per batch (upstream per-device batch)
                  max_docs:int|None=None, # use only the first documents of the train split (None: all)
                  tokenizer:str='embedded', progress:bool=True) -> dict:
    "Real-token share per batch: packing vs one (truncated, padded) document per sequence, on the embedded corpus."
    from concept_nb.data import embedded_texts, load_tokenizer, pack_documents
    t0 = time.time()
    texts, tok = embedded_texts('train', max_docs=max_docs), load_tokenizer(tokenizer)
    special = {tok.cls_token_id, tok.sep_token_id} - {None}
    n_text = sum(len(x) for x in tok(texts, add_special_tokens=False)['input_ids'])
    rows = []
    for bs in block_sizes:
        for mode, pack, width in PACKING_MODES:
            width = bs if width else None
            ds = pack_documents(texts, tok, block_size=bs, pack=pack)
            ids, lens = ds['input_ids'], [int(sum(m)) for m in ds['attention_mask']]
            shares = _batch_shares(lens, batch, width)
            slots = sum(len(lens[i:i + batch]) * (width or max(lens[i:i + batch])) for i in range(0, len(lens), batch))
            text = sum(t not in special for x in ids for t in x)
            rows.append(dict(block=bs, mode=mode, sequences=len(ids), batches=len(shares), real_share=sum(lens) / slots,
                             min_batch_share=min(shares), text_share=text / slots, text_kept=text / n_text))
            log(progress, f"block {bs} {mode}: real {rows[-1]['real_share']:.3f}")
    settings = dict(block_sizes=list(block_sizes), batch=batch, max_docs=max_docs, tokenizer=tokenizer,
                    documents=len(texts), corpus_tokens=n_text)
    res = dict(benchmark='packing', settings=settings, rows=rows, wall_s=round(time.time() - t0, 1))
    res['targets'] = check_targets(res)
    return res

PACKING_COLUMNS = ['block', 'mode', 'sequences', ('real_share', 'real share', '{:.2%}'),
                   ('min_batch_share', 'worst batch', '{:.1%}'), ('text_share', 'text share', '{:.1%}'),
                   ('text_kept', 'corpus kept', '{:.1%}')]


# ---------------------------------------------------------------- GPU throughput

def _gpu_row(name, s, seq_len, batch, steps, reps, warmup, dev, dtype, compile, seed):
    torch.manual_seed(seed)
    model = make_step_model(name, s, seq_len).to(dev).train()
    opt, params = _optimizer(model, dev), n_params(model)
    # compile: True (inductor) or a backend name ('eager' traces without generating code: the CPU dry run)
    fwd = model if not compile else torch.compile(model, **({'backend': compile} if isinstance(compile, str) else {}))
    batch_ = {k: v.to(dev) for k, v in step_batch(name, batch, seq_len, s.vocab, seed).items()}
    fn = _train_step(fwd, batch_, opt, dev, dtype)
    for _ in range(warmup): fn()
    if dev.type == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    times = [time_call(lambda: [fn() for _ in range(steps)], dev) / steps for _ in range(reps)]
    r = dict(_step_row(name, seq_len, batch, batch_, s, times), params=params,
             peak_gb=torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else None)
    r['achieved_tflops'] = r['flops'] / r['time_s'] / 1e12
    return r   # the model, optimiser and batch go with this frame: the caller collects

def gpu_bench(models=('perceiver_mlm', 'perceiver_posonly_mlm', 'tsdae_posonly', 'diffusion_mlm', 'bert_mlm'),
              shape:Shape|str='l6', seq_len:int=512, batch:int=64,
              steps:int=10, # steps per timed block
              reps:int=3, warmup:int=3,
              device:str='cuda', dtype:str='bf16',
              compile:bool|str=False, # torch.compile every model (True: inductor; or a backend name)
              peak:float|None=None, # peak TFLOP/s for MFU (default: looked up from the device name)
              seed:int=0, progress:bool=True) -> dict:
    "Training throughput, MFU and peak memory of each model at one shape, bf16 on a GPU."
    dev, s, t0 = device_of(device), get_shape(shape), time.time()
    if dev.type == 'cuda': torch.set_float32_matmul_precision('high')
    peak = peak or (peak_tflops(torch.cuda.get_device_name(0)) if dev.type == 'cuda' else None)
    rows = []
    for name in models:
        r = _gpu_row(name, s, seq_len, batch, steps, reps, warmup, dev, dtype, compile, seed)
        gc.collect()
        if dev.type == 'cuda': torch.cuda.empty_cache()
        r['mfu'] = r['achieved_tflops'] / peak if peak else None
        rows.append(r)
        log(progress, f"{name}: {r['tokens_per_s']:,.0f} tok/s, {r['achieved_tflops']:.1f} TFLOP/s")
    if any(r['model'] == 'bert_mlm' for r in rows):
        add_flags(add_ratios(rows, 'bert_mlm', mem_key='peak_gb'), 'bert_mlm')
    settings = dict(models=list(models), shape=asdict(s), shape_label=s.label(), seq_len=seq_len, batch=batch,
                    steps=steps, reps=reps, warmup=warmup, device=str(dev), dtype=dtype, compile=compile,
                    peak_tflops=peak, optimizer='AdamW (fused on CUDA) lr 1e-4 wd 0.01', dropout=0.0)
    res = dict(benchmark='gpu', settings=settings, rows=rows, wall_s=round(time.time() - t0, 1))
    res['targets'] = check_targets(res)
    return res

GPU_COLUMNS = ['model', ('params', 'params'), ('time_s', 'step s'), ('tokens_per_s', 'real tok/s'),
               ('achieved_tflops', 'TFLOP/s'), ('mfu', 'MFU', '{:.1%}'), ('peak_gb', 'peak GB', '{:.1f}'),
               ('speedup', 'speed-up ×'), ('flop_ratio', 'FLOP ideal ×'), ('spread', 'max/min', '{:.2f}'), 'flags']


# ---------------------------------------------------------------- running, reporting, command line

def _cli_kwargs(name:str, quick:bool, cuda:bool, reps:int|None, max_reps:int|None) -> dict:
    "The settings the command line uses for `encoder` / `step`: tiny when quick, L6 in bf16 on CUDA, else the defaults."
    if name == 'encoder':
        kw = (dict(seq_lens=(32, 64), tokens=64, shape='tiny', reps=1) if quick else
              dict(seq_lens=(512, 1024, 2048, 4096, 8192, 16384, 32768), tokens=32768, shape='l6', reps=5,
                   reps_large=None) if cuda else {})
    else:
        kw = (dict(plan={32: STEP_MODELS, 64: STEP_MODELS[:3]}, tokens=64, shape='tiny', reps=1) if quick else
              dict(plan={512: STEP_MODELS, 2048: STEP_MODELS, 4096: STEP_MODELS}, tokens=32768, shape='l6', reps=5,
                   reps_large=None) if cuda else {})
    if reps: kw.update(reps=reps, reps_large=None)
    kw['max_reps'] = max_reps if max_reps is not None else (None if quick or cuda else MAX_REPS)
    return kw

def run_benchmark(name:str, quick:bool=False, device:str='auto', reps:int|None=None, max_reps:int|None=None,
                  profile:bool=False, compile:bool=False, progress:bool=True) -> dict|None:
    "Run one benchmark with its CLI defaults; returns its record (with `machine`), or None when `gpu` has no CUDA."
    if name not in BENCHMARKS: raise ValueError(f"benchmark {name!r}: expected one of {BENCHMARKS} or 'all'")
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None
    dev = device_of(device)
    if name == 'gpu':
        if not quick and dev.type != 'cuda':
            log(progress, "gpu: CUDA is not available on this machine; skipped (run it where a GPU is).")
            return None
        kw = dict(shape='tiny', seq_len=64, batch=4, steps=2, reps=1, warmup=1) if quick else {}
        res = gpu_bench(device=str(dev), dtype='bf16' if dev.type == 'cuda' else 'fp32', compile=compile,
                        progress=progress, **({'reps': reps} if reps else {}), **kw)
    elif name == 'packing':
        res, dev = packing_bench(max_docs=200 if quick else None, progress=progress), torch.device('cpu')
    else:
        bench_fn = encoder_bench if name == 'encoder' else step_bench
        res = bench_fn(device=str(dev), profile=profile, progress=progress,
                       **_cli_kwargs(name, quick, dev.type == 'cuda', reps, max_reps))
    res['quick'] = quick
    res['machine'] = dict(machine_info(str(dev)), loadavg_before=load_before)
    return res

BREAKDOWN_PARTS = ['encoder', 'decoder', 'head_loss', 'optimizer', 'step']
COLUMNS = dict(encoder=ENCODER_COLUMNS, step=STEP_COLUMNS, packing=PACKING_COLUMNS, gpu=GPU_COLUMNS)

def busy_note(machine:dict) -> str:
    "A warning when the 1-minute load (before or after the run) says other jobs shared the CPUs, else ''."
    loads = [l[0] for l in (machine.get('loadavg_before'), machine.get('loadavg')) if l]
    if not loads or max(loads) <= 0.75 * (machine.get('cpu_count') or 1): return ''
    return (f"BUSY MACHINE: 1-minute load {max(loads):.2f} on {machine.get('cpu_count')} CPUs; these figures are not "
            "for the README tables (rerun on a quiet machine)")

def report(res:dict) -> str:
    "The printed report of a record: header, table, flags, targets and (if any) breakdown and profile."
    m, st = res['machine'], res['settings']
    head = (f"## {res['benchmark']}{' (quick)' if res.get('quick') else ''}: {m.get('gpu') or m['cpu_model']}, "
            f"{m['cpu_count']} CPUs, torch {m['torch']}, load {m.get('loadavg_before')} -> {m.get('loadavg')}, "
            f"{res['wall_s']} s\n" + (f"shape {st['shape_label']}, " if 'shape_label' in st else '')
            + f"device {st.get('device', 'cpu')}, dtype {st.get('dtype', '-')}")
    parts = [head, format_table(res['rows'], COLUMNS[res['benchmark']])]
    if res['benchmark'] != 'packing': parts.append(format_flags(res['rows']))
    parts += [x for x in (busy_note(m), format_targets(res['targets'])) if x]
    if res.get('breakdown'):
        parts.append("where a training step's time goes (seconds, nested runs; the model's forward, not its "
                     "decode-only path, defines 'head_loss'):\n"
                     + format_table(res['breakdown'], ['N', 'model'] + BREAKDOWN_PARTS))
    for model, ops in (res.get('profile') or {}).items():
        parts.append(f"profile of one {model} call (top self-time ops):\n"
                     + format_table(ops, ['op', 'self_ms', 'share', 'calls']))
    return '\n\n'.join(parts)

def default_out(name:str, quick:bool=False, device:str='cpu') -> Path:
    "benchmarks/results/<name>[-cuda][-quick].json of this checkout."
    cuda = torch.device(device).type == 'cuda' and name in ('encoder', 'step')
    return ROOT / 'benchmarks' / 'results' / f"{name}{'-cuda' if cuda else ''}{'-quick' if quick else ''}.json"

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python benchmarks/bench.py', description='concept encoder vs BERT benchmarks')
    p.add_argument('name', choices=BENCHMARKS + ('all',))
    p.add_argument('--quick', action='store_true', help='tiny shapes, one repetition (seconds)')
    p.add_argument('--out', help='JSON file (a folder for "all"); default benchmarks/results/<name>.json')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda')
    p.add_argument('--reps', type=int, default=None, help='timed repetitions at least (median)')
    p.add_argument('--max-reps', type=int, default=None,
                   help=f'repetitions at most while a speed-up is not stable to ±{TOLERANCE:.0%} '
                        f'(default {MAX_REPS} on a CPU, no extra repetitions on CUDA or with --quick)')
    p.add_argument('--profile', action='store_true', help='torch.profiler table of the concept models at the largest N')
    p.add_argument('--compile', action='store_true', help='gpu: torch.compile the models')
    p.add_argument('--threads', type=int, default=None,
                   help='torch CPU threads for encoder/step (default: 1 on a CPU device, unchanged on CUDA)')
    return p

def main(argv:list[str]|None=None) -> int:
    "`python benchmarks/bench.py <name> [options]`: run, print the report, write the JSON record."
    a = parser().parse_args(argv)
    try: dev = device_of(a.device)
    except (ValueError, RuntimeError) as e: raise SystemExit(f"error: {e}") from None
    for name in BENCHMARKS if a.name == 'all' else (a.name,):
        with torch_threads(a.threads or (1 if dev.type == 'cpu' else None)):
            res = run_benchmark(name, quick=a.quick, device=a.device, reps=a.reps, max_reps=a.max_reps,
                                profile=a.profile, compile=a.compile)
        if res is None: continue
        print(report(res), flush=True)
        out = Path(a.out) / f"{name}.json" if (a.out and a.name == 'all') else Path(a.out) if a.out else \
              default_out(name, a.quick, res['settings'].get('device', 'cpu'))
        print(f"\nwrote {write_json(out, res)}\n", flush=True)
    return 0

if __name__ == '__main__': raise SystemExit(main())
