"""Measuring machinery of the benchmarks: devices and threads, interleaved timing until the ratios are stable, peak
memory, the models and batches compared, tables, flags and targets. `bench.py` runs the benchmarks with it."""
from __future__ import annotations
import contextlib, ctypes, gc, json, math, os, platform, statistics, time
from pathlib import Path
import torch, torch.nn as nn
from concept_nb.config import ConceptEncoderConfig
from concept_nb.encoder import ConceptEncoder
from concept_nb.heads import build_model, noise_tokens
from concept_nb.flops import ENCODER_MODES, TSDAE_DELETION, Shape, get_shape, peak_tflops
from concept_nb.core import run_environment

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4    # the embedded tokenizer's special ids; random ids start at 5
MAX_SHARE = 1.10    # a measured speed-up above 110% of the FLOP ideal is an artefact until explained
MAX_SPREAD = 1.10   # max/min time over the repetitions of one model above this: the machine was not steady
TOLERANCE = 0.10    # repeat until every ratio to the baseline is known to +-10% (95% interval)


# ---------------------------------------------------------------- machine, device, threads

def _cpu_model() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def machine_info(device:str='cpu') -> dict:
    "Machine, device, versions and load of this process (for the JSON records)."
    info = dict(run_environment(), cpu_model=_cpu_model(), torch_threads=torch.get_num_threads(),
                loadavg=[round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None)
    if str(device).startswith('cuda') and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info.update(gpu=name, gpu_capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    peak_bf16_tflops=peak_tflops(name), cuda=torch.version.cuda)
    return info

def device_of(device:str|None='auto') -> torch.device:
    "'auto' (or None): CUDA when available, else CPU; a one-line error for CUDA on a machine without it."
    if device in (None, 'auto'): return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    d = torch.device(device)
    if d.type == 'cuda' and not torch.cuda.is_available(): raise ValueError(f"device={device!r}: CUDA is not available")
    return d

@contextlib.contextmanager
def torch_threads(n:int|None):
    "Run the block with `torch.set_num_threads(n)` (None: unchanged), restoring the previous count afterwards."
    old = torch.get_num_threads()
    if n: torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(old)

def write_json(path, obj) -> Path:
    "Write `obj` as indented JSON to `path` atomically (a temporary file renamed over it)."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + '\n'); os.replace(tmp, path)
    return path

def log(progress, *a):
    if progress: print(*a, flush=True)


# ---------------------------------------------------------------- timing and stability

def _sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()

def time_call(fn, device='cpu') -> float:
    "Wall seconds of one call of `fn` (synchronising CUDA around it)."
    _sync(device); t0 = time.perf_counter(); fn(); _sync(device)
    return time.perf_counter() - t0

# two-sided 95% Student t quantiles by degrees of freedom; between entries the smaller df's (larger, safer) value
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18, 15: 2.13,
        20: 2.09, 30: 2.04, 60: 2.00}

def ratio_stability(base_times:list[float], times:list[float]) -> float|None:
    "Relative 95% half-width of the speed-up base/time over paired repetitions (t interval of the log ratios)."
    logs = [math.log(b / t) for b, t in zip(base_times, times, strict=True)]
    if len(logs) < 2: return None
    t = _T95[max(k for k in _T95 if k <= len(logs) - 1)]
    return math.exp(t * statistics.stdev(logs) / math.sqrt(len(logs))) - 1

def interleaved_times(fns:dict, # name -> zero-argument callable
                      reps:int=3, # repetitions at least; each runs every callable once
                      device='cpu',
                      baseline:str|None=None, # with `max_reps`: repeat until every ratio to it is stable to `tol`
                      max_reps:int|None=None, # repetitions at most (None: `reps`)
                      tol:float=TOLERANCE) -> dict:
    "Seconds per call for each callable: {name: [t_rep0, t_rep1, ...]}, the order rotated every repetition."
    if reps < 1: raise ValueError(f"reps={reps}: must be >= 1")
    names, out = list(fns), {k: [] for k in fns}
    stable = lambda: all((s := ratio_stability(out[baseline], out[k])) is not None and s <= tol
                         for k in names if k != baseline)
    gc.collect(); was = gc.isenabled(); gc.disable()   # no collector pauses inside the timed calls
    try:
        for r in range(max(reps, max_reps or reps)):
            for k in names[r % len(names):] + names[:r % len(names)]: out[k].append(time_call(fns[k], device))
            if r + 1 >= reps and (baseline is None or stable()): break
    finally:
        if was: gc.enable()
    return out


# ---------------------------------------------------------------- peak memory

def _status_kb(key:str) -> int:
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'): return int(line.split()[1])
    raise KeyError(key)

def _malloc_trim():
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError): pass

def rss_peak_supported() -> bool:
    "True where the process's peak RSS can be reset and read (Linux `/proc/self/clear_refs`)."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        _status_kb('VmHWM'); return True
    except (OSError, KeyError): return False

def peak_memory(fn, device='cpu') -> int|None:
    "Extra bytes at the peak of one call of `fn`: CUDA allocator peak, or peak RSS on Linux CPU; None if unmeasurable."
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(); gc.collect(0); torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        fn(); torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not rss_peak_supported(): return None
    gc.collect(0); _malloc_trim()   # a full collection costs ~0.5 s with transformers loaded: callers collect once
    base = _status_kb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')   # VmHWM := current RSS
    fn()
    return max(0, _status_kb('VmHWM') - base) * 1024

def memory_method(dev) -> str:
    if dev.type == 'cuda': return 'torch.cuda.max_memory_allocated above the allocation before the call'
    return ('peak RSS (VmHWM, reset via /proc/self/clear_refs) above RSS before the call, after gc + malloc_trim; '
            'activations + parameter gradients' if rss_peak_supported() else 'unavailable on this OS')


# ---------------------------------------------------------------- models

def concept_config(shape:Shape|str, max_len:int, **kwargs) -> ConceptEncoderConfig:
    "A `ConceptEncoderConfig` of `shape`, dropout 0, positions up to `max_len`."
    s = get_shape(shape)
    return ConceptEncoderConfig(vocab_size=s.vocab, concept_num=s.concepts, hidden_size=s.hidden,
                                num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                intermediate_size=s.intermediate, max_sequence_length=max_len,
                                hidden_dropout_prob=0., attention_probs_dropout_prob=0.,
                                pad_token_id=PAD, unk_token_id=UNK, cls_token_id=CLS, sep_token_id=SEP,
                                mask_token_id=MASK, **kwargs)

def bert_config(shape:Shape|str, max_len:int):
    "The matching `BertConfig`: same H, L, heads, FFN width (I), vocabulary; SDPA attention, dropout 0."
    from transformers import BertConfig
    s = get_shape(shape)
    return BertConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      intermediate_size=s.intermediate, max_position_embeddings=max(max_len, 512),
                      hidden_dropout_prob=0., attention_probs_dropout_prob=0., pad_token_id=PAD,
                      attn_implementation='sdpa')

def make_encoder(mode:str, shape:Shape|str, max_len:int) -> nn.Module:
    "An `ENCODER_MODES` encoder: `BertModel` (no pooler) or a `ConceptEncoder` (standard/BiXT/recursive)."
    if mode == 'bert':
        from transformers import BertModel
        return BertModel(bert_config(shape, max_len), add_pooling_layer=False)
    if mode not in ENCODER_MODES: raise ValueError(f"mode={mode!r}: expected one of {ENCODER_MODES}")
    L = get_shape(shape).layers
    return ConceptEncoder(concept_config(shape, max_len, use_bixt=mode == 'bixt',
                                         num_iterations=L if mode == 'recursive' else None))

def make_step_model(name:str, shape:Shape|str, max_len:int) -> nn.Module:
    "A pretraining model: `BertForMaskedLM` for 'bert_mlm', else `build_model(name, ...)`."
    s = get_shape(shape)
    if name == 'bert_mlm':
        from transformers import BertForMaskedLM
        return BertForMaskedLM(bert_config(s, max_len))
    layers = s.diffusion_decoder_layers if name == 'diffusion_mlm' else s.decoder_layers
    return build_model(name, concept_config(s, max_len, decoder_layers=layers))

def n_params(model:nn.Module) -> int:
    "Distinct trainable parameters (tied weights counted once)."
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# ---------------------------------------------------------------- batches

def mlm_batch(B:int, N:int, vocab:int, frac:float=0.15, seed:int=0) -> dict:
    "Masked-LM batch: exactly round(frac*N) [MASK]ed, labelled positions per sequence."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK + 1, vocab, (B, N), generator=g)
    k = max(1, round(frac * N))
    sel = torch.zeros(B, N, dtype=torch.bool).scatter_(1, torch.rand(B, N, generator=g).argsort(1)[:, :k], True)
    return dict(input_ids=ids.masked_fill(sel, MASK), attention_mask=torch.ones(B, N, dtype=torch.long),
                labels=ids.masked_fill(~sel, -100))

def masked_reconstruction_batch(B:int, N:int, vocab:int, deletion:float=0.6, seed:int=0) -> dict:
    "Masked-reconstruction batch: clean ids, `deletion` of the tokens hidden by the attention mask, dense labels."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK + 1, vocab, (B, N), generator=g)
    keep = torch.rand(B, N, generator=g) >= deletion; keep[:, 0] = True
    return dict(input_ids=ids, attention_mask=keep.long(), labels=ids.clone())

def tsdae_batch(B:int, N:int, vocab:int, deletion:float=TSDAE_DELETION, seed:int=0) -> dict:
    "TSDAE batch: exactly N - round(deletion*N) survivors per row, closed up, for the encoder; dense labels over all N."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK + 1, vocab, (B, N), generator=g)
    k = N - round(deletion * N)
    keep = torch.rand(B, N, generator=g).argsort(1)[:, :k].sort(1).values      # (B, k) surviving positions, in order
    return dict(input_ids=ids.gather(1, keep), attention_mask=torch.ones(B, k, dtype=torch.long), labels=ids.clone())

def diffusion_batch(B:int, N:int, vocab:int, t_min:float=0.3, seed:int=0) -> dict:
    "Masked-diffusion batch: clean encoder input, decoder input noised at t evenly spread over [t_min, 1]."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK + 1, vocab, (B, N), generator=g)
    t = torch.linspace(t_min, 1., B) if B > 1 else torch.tensor([(1 + t_min) / 2])
    ones = torch.ones(B, N, dtype=torch.long)
    noisy, labels = noise_tokens(ids, ones, MASK, t, generator=g)
    return dict(input_ids=ids, attention_mask=ones, decoder_input_ids=noisy, decoder_attention_mask=ones,
                labels=labels, t=t)

def step_batch(name:str, B:int, N:int, vocab:int, seed:int=0) -> dict:
    "The batch a pretraining model `name` trains on."
    if name == 'tsdae_posonly': return tsdae_batch(B, N, vocab, seed=seed)
    if name == 'masked_reconstruction_posonly': return masked_reconstruction_batch(B, N, vocab, seed=seed)
    if name == 'diffusion_mlm': return diffusion_batch(B, N, vocab, seed=seed)
    return mlm_batch(B, N, vocab, seed=seed)


# ---------------------------------------------------------------- ratios, flags, tables

def add_ratios(rows:list[dict], # rows with 'N', 'model', the `time_key` field and 'flops'
               baseline:str, # model name of the reference rows ('bert' / 'bert_mlm')
               time_key:str='time_s', # lower is better
               mem_key:str|None='peak_mb') -> list[dict]:
    "Add `speedup`, `flop_ratio` (ideal), `share_of_ideal` and `mem_ratio` vs the baseline row of the same N."
    base = {r['N']: r for r in rows if r['model'] == baseline}
    for r in rows:
        b = base.get(r['N'])
        if b is None: continue
        r['speedup'] = b[time_key] / r[time_key]
        r['flop_ratio'] = b['flops'] / r['flops']
        if 'flops_ideal' in r:   # step rows: the ideal decodes only labelled rows, 'impl' what the model computes
            r['flop_ratio'], r['flop_ratio_impl'] = b['flops'] / r['flops_ideal'], b['flops'] / r['flops']
        r['share_of_ideal'] = r['speedup'] / r['flop_ratio']
        if mem_key and r.get(mem_key) and b.get(mem_key): r['mem_ratio'] = b[mem_key] / r[mem_key]
    return rows

def add_flags(rows:list[dict], baseline:str, max_share:float=MAX_SHARE, max_spread:float=MAX_SPREAD,
              tol:float=TOLERANCE) -> list[dict]:
    "Add `reps`, `spread` (max/min time), `ratio_pm` (95% half-width of the speed-up) and `flags` (reasons for doubt)."
    base = {r['N']: r for r in rows if r['model'] == baseline}
    for r in rows:
        ts, b = r.get('times_s') or [], base.get(r['N'])
        r['reps'], r['spread'] = len(ts), (max(ts) / min(ts) if ts else None)
        r['ratio_pm'] = ratio_stability(b['times_s'], ts) if b and r is not b else None
        flags = []
        if r.get('share_of_ideal', 0) > max_share: flags.append(f"{r['share_of_ideal']:.0%} of FLOP ideal")
        if r['spread'] and r['spread'] > max_spread: flags.append(f"spread {r['spread']:.2f}")
        if r['ratio_pm'] is not None and r['ratio_pm'] > tol: flags.append(f"ratio ±{r['ratio_pm']:.0%}")
        r['flags'] = flags
    return rows

def format_stability(rows:list[dict]) -> str:
    "How stable the speed-ups are: per N, the repetitions taken and the widest 95% interval of a ratio to the baseline."
    parts = []
    for N in dict.fromkeys(r['N'] for r in rows):
        at = [r for r in rows if r['N'] == N]
        pms = [r['ratio_pm'] for r in at if r.get('ratio_pm') is not None]
        pm = f"±{max(pms):.0%}" if pms else 'unknown (one repetition)'
        parts.append(f"N={N}: {max(r.get('reps', 0) for r in at)} reps, speed-ups {pm}")
    return 'stability (95%): ' + '; '.join(parts)

def format_flags(rows:list[dict]) -> str:
    "The stability line, then one SUSPECT line per flagged row or a line saying that none is."
    bad = [f"SUSPECT  N={r['N']} {r['model']}: " + '; '.join(r['flags']) for r in rows if r.get('flags')]
    ok = (f"no row flagged (share of ideal <= {MAX_SHARE:.0%}, repetition max/min <= {MAX_SPREAD}, "
          f"speed-ups known to ±{TOLERANCE:.0%} where measured)")
    return '\n'.join([format_stability(rows)] + (bad or [ok]))

def _fmt(v) -> str:
    if isinstance(v, float): return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, list): return ', '.join(map(str, v))
    return '' if v is None else f"{v:,}" if isinstance(v, int) else str(v)

def format_table(rows:list[dict], columns:list) -> str:
    "A markdown table of `rows`; `columns`: keys, (key, header) or (key, header, format) e.g. '{:.1%}'; missing: blank."
    cols = [(c, c, None) if isinstance(c, str) else tuple(c) + (None,) * (3 - len(c)) for c in columns]
    cell = lambda v, f: '' if v is None else f.format(v) if f else _fmt(v)
    lines = ['| ' + ' | '.join(h for _, h, _ in cols) + ' |', '|' + '|'.join('---' for _ in cols) + '|']
    lines += ['| ' + ' | '.join(cell(r.get(k), f) for k, _, f in cols) + ' |' for r in rows]
    return '\n'.join(lines)


# ---------------------------------------------------------------- targets

def _target(name, value, goal, row=None, unit='×', lower=False) -> dict:
    status = 'N/A' if value is None else ('PASS' if (value <= goal if lower else value >= goal) else 'MISS')
    return dict(target=name, value=value, goal=goal, ideal=row and row.get('flop_ratio'), unit=unit, status=status,
                flags=(row or {}).get('flags') or [])

def _row(res, N, model):
    return next((r for r in res['rows'] if r.get('N') == N and r['model'] == model), None)

def check_targets(res:dict) -> list[dict]:
    "PASS/MISS/N/A of the issue's targets that a benchmark record covers."
    b, dev, out = res['benchmark'], res['settings'].get('device', 'cpu'), []
    if b == 'encoder':
        for N, goal in ((512, 5.), (4096, 25.)):
            r = _row(res, N, 'concept')
            out.append(_target(f"encoder fwd+bwd speed-up vs BertModel at N={N} ({dev}) >= {goal:g}x",
                               r and r.get('speedup'), goal, r))
        r = _row(res, 8192, 'concept')
        out.append(_target(f"encoder peak memory at N=8192 <= 1/10 of BertModel ({dev}): BERT mem / concept mem >= 10",
                           r and r.get('mem_ratio'), 10.))
    elif b == 'step':
        for N, goal in ((512, 2.), (4096, 5.)):
            r = _row(res, N, 'perceiver_mlm')
            out.append(_target(f"perceiver_mlm training-step speed-up vs BertForMaskedLM at N={N} ({dev}) >= {goal:g}x",
                               r and r.get('speedup'), goal, r))
    elif b == 'gpu':
        r = next((r for r in res['rows'] if r['model'] == 'perceiver_mlm'), None)
        out.append(_target(f"perceiver_mlm real tokens/s on one GPU ({dev}) >= 1M", r and r['tokens_per_s'], 1e6,
                           unit=' tok/s'))
    elif b == 'packing':
        for r in res['rows']:
            if r['mode'] == 'packed':
                out.append(_target(f"packed real-token share at block {r['block']} >= 98%", r['real_share'], 0.98,
                                   unit='%'))
    return out

def format_targets(targets:list[dict]) -> str:
    "One `PASS|MISS|N/A  target: value (FLOP ideal) [SUSPECT: flags]` line per target."
    lines = []
    for t in targets:
        v = '' if t['value'] is None else f"{t['value']:.2%}" if t['unit'] == '%' else \
            f"{t['value']:,.0f}{t['unit']}" if t['value'] >= 1000 else f"{t['value']:.3g}{t['unit']}"
        share = t['ideal'] and t['value'] is not None and t['value'] / t['ideal']
        ideal = f" (FLOP ideal {t['ideal']:.3g}×; measured = {share:.0%} of it)" if share else ''
        suspect = f"  [SUSPECT: {'; '.join(t['flags'])}]" if t.get('flags') else ''
        lines.append(f"{t['status']:<4}  {t['target']}: {v}{ideal}{suspect}")
    return '\n'.join(lines)
