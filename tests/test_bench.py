"""CI-sized runs of the benchmark scripts in `benchmarks/` (tiny shapes, one repetition): record structure, positive
times, ratio columns, the flags that mark untrustworthy figures, and the command line run as users run it."""
import json, math, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))   # the scripts import their sibling `harness` as a top-level module
import bench, harness  # noqa: E402
from concept_nb.flops import STEP_MODELS, forward_flops  # noqa: E402
from harness import (add_flags, add_ratios, check_targets, format_flags, format_table, format_targets,  # noqa: E402
                     interleaved_times, mlm_batch, peak_memory, ratio_stability, rss_peak_supported)
from bench import encoder_bench, step_bench, packing_bench, gpu_bench, main  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny ops on a shared 2-core machine: a second OpenMP thread only adds waiting. Restored afterwards."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(rows, N, model):
    return next(r for r in rows if r['N'] == N and r['model'] == model)


def test_add_ratios_and_table():
    rows = add_ratios([dict(N=4, model='bert', time_s=3., flops=90, peak_mb=30.),
                       dict(N=4, model='x', time_s=1., flops=30, flops_ideal=10, peak_mb=3.)], 'bert')
    x = rows[1]
    assert (x['speedup'], x['flop_ratio'], x['flop_ratio_impl'], x['mem_ratio']) == (3., 9., 3., 10.)
    assert x['share_of_ideal'] == pytest.approx(1 / 3)
    t = format_table(rows, ['N', 'model', ('speedup', 'speed-up')])
    assert t.splitlines()[0] == '| N | model | speed-up |' and t.splitlines()[-1] == '| 4 | x | 3 |'


def test_targets():
    res = dict(benchmark='encoder', settings=dict(device='cpu'),
               rows=[dict(N=512, model='concept', speedup=5.5, flop_ratio=2.),
                     dict(N=4096, model='concept', speedup=10., flop_ratio=9.),
                     dict(N=8192, model='concept', mem_ratio=4.)])
    assert [t['status'] for t in check_targets(res)] == ['PASS', 'MISS', 'MISS']
    first = format_targets(check_targets(res)).splitlines()[0]
    assert first.startswith('PASS  encoder fwd+bwd speed-up vs BertModel at N=512')
    pk = dict(benchmark='packing', settings={},
              rows=[dict(block=128, mode='packed', real_share=0.999), dict(block=128, mode='x', real_share=0.4)])
    assert [t['status'] for t in check_targets(pk)] == ['PASS']
    assert check_targets(dict(benchmark='gpu', settings={}, rows=[]))[0]['status'] == 'N/A'


@pytest.mark.skipif(not rss_peak_supported(), reason='needs Linux /proc/self/clear_refs')
def test_peak_memory_sees_a_known_allocation():
    small = peak_memory(lambda: None)
    big = peak_memory(lambda: torch.ones(32 * 2**20 // 4).add_(1).sum())
    assert small < 8 * 2**20 and 28 * 2**20 < big < 48 * 2**20


def test_encoder_bench_tiny():
    res = encoder_bench(seq_lens=(16, 32), tokens=32, shape='tiny', reps=1, progress=False)
    assert res['benchmark'] == 'encoder' and res['settings']['reps'] == 1
    assert [(r['N'], r['batch'], r['model']) for r in res['rows']] == \
        [(N, 32 // N, m) for N in (16, 32) for m in ('bert', 'concept', 'bixt', 'recursive')]
    for r in res['rows']:
        b = _base(res['rows'], r['N'], 'bert')
        assert r['time_s'] > 0 and r['times_s'] == [r['time_s']] and r['params'] > 0
        assert r['speedup'] == pytest.approx(b['time_s'] / r['time_s'])
        assert r['flop_ratio'] == pytest.approx(b['flops'] / r['flops'])
        assert r['share_of_ideal'] == pytest.approx(r['speedup'] / r['flop_ratio'])
        assert r['flops'] == 3 * r['batch'] * forward_flops(r['model'], r['N'], 'tiny')['total']
        if rss_peak_supported():
            assert r['peak_mb'] >= 0 and r['mem_ratio'] == pytest.approx(b['peak_mb'] / r['peak_mb'])
    assert len(res['targets']) == 3 and all(t['status'] == 'N/A' for t in res['targets'])
    json.dumps(res)


def test_step_bench_tiny():
    res = step_bench(plan={16: STEP_MODELS, 32: STEP_MODELS[:2]}, tokens=32, shape='tiny', reps=1, progress=False)
    want = [(16, m) for m in STEP_MODELS] + [(32, m) for m in STEP_MODELS[:2]]
    assert [(r['N'], r['model']) for r in res['rows']] == want
    for r in res['rows']:
        b = _base(res['rows'], r['N'], 'bert_mlm')
        assert r['time_s'] > 0 and r['real_tokens'] == r['batch'] * r['N'] == 32
        assert r['tokens_per_s'] == pytest.approx(r['real_tokens'] / r['time_s'])
        assert r['speedup'] == pytest.approx(r['tokens_per_s'] / b['tokens_per_s'])
        assert r['flop_ratio'] == pytest.approx(b['flops'] / r['flops_ideal'])
        assert r['flop_ratio_impl'] == pytest.approx(b['flops'] / r['flops'])
    mlm = _base(res['rows'], 16, 'perceiver_mlm')
    assert mlm['labelled'] == 2 * round(0.15 * 16)                     # exactly 15% of every sequence
    assert _base(res['rows'], 16, 'tsdae_posonly')['labelled'] == 32     # dense reconstruction
    with pytest.raises(ValueError, match='bert_mlm'):
        step_bench(plan={16: ('perceiver_mlm',)}, shape='tiny', progress=False)


def test_mlm_batch_labels_only_masked_positions():
    b = mlm_batch(3, 20, 50, seed=1)
    lab = b['labels'] != -100
    assert lab.sum(1).tolist() == [3, 3, 3]
    assert (b['input_ids'][lab] == harness.MASK).all() and (b['input_ids'][~lab] > harness.MASK).all()


def test_packing_bench_small():
    res = packing_bench(block_sizes=(128, 512), batch=4, max_docs=30, progress=False)
    assert [(r['block'], r['mode'].split(',')[0]) for r in res['rows']] == \
        [(b, m) for b in (128, 512) for m in ('packed', 'one doc / seq', 'one doc / seq')]
    for b in (128, 512):
        packed, upstream, dynamic = [r for r in res['rows'] if r['block'] == b]
        assert 0 < upstream['real_share'] <= dynamic['real_share'] <= 1
        assert upstream['real_share'] < packed['real_share'] <= 1
        assert packed['batches'] == -(-packed['sequences'] // 4) and upstream['sequences'] == 30
        assert packed['text_kept'] >= upstream['text_kept'] and packed['text_kept'] == pytest.approx(1, abs=0.02)
        assert packed['text_share'] < packed['real_share'] and packed['min_batch_share'] <= packed['real_share']
    assert res['rows'][1]['text_kept'] < 0.95   # block 128 truncates the embedded corpus's documents
    assert res['settings']['documents'] == 30


def test_gpu_bench_code_path_on_cpu():
    res = gpu_bench(models=('perceiver_mlm', 'bert_mlm'), shape='tiny', seq_len=16, batch=2, steps=1, reps=1, warmup=1,
                    device='cpu', dtype='fp32', progress=False)
    assert [r['model'] for r in res['rows']] == ['perceiver_mlm', 'bert_mlm']
    assert all(r['tokens_per_s'] > 0 and r['achieved_tflops'] > 0 and r['mfu'] is None for r in res['rows'])
    assert res['targets'][0]['status'] == 'MISS'   # a tiny CPU run is nowhere near 1M tokens/s


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / 'step.json'
    assert main(['step', '--quick', '--out', str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec['benchmark'] == 'step' and rec['quick'] and rec['machine']['torch'] == torch.__version__
    assert {'settings', 'rows', 'targets', 'wall_s'} <= set(rec) and rec['rows']
    printed = capsys.readouterr().out
    assert '| N | batch | model |' in printed and 'perceiver_mlm training-step speed-up' in printed
    with pytest.raises(SystemExit): main(['nonsense'])


def test_step_profile_and_breakdown():
    res = step_bench(plan={16: ('bert_mlm', 'perceiver_mlm')}, tokens=16, shape='tiny', reps=1, profile=True,
                     progress=False)
    assert [b['model'] for b in res['breakdown']] == ['bert_mlm', 'perceiver_mlm']
    for b in res['breakdown']:
        assert b['step'] > 0 and b['encoder'] > 0
        assert b['encoder'] + b['decoder'] + b['head_loss'] + b['optimizer'] == pytest.approx(b['step'])
    ops = res['profile']['perceiver_mlm']
    assert ops and all(o['self_ms'] >= 0 and o['calls'] >= 1 for o in ops) and 0 < sum(o['share'] for o in ops) <= 1.001


def test_torch_threads_restores():
    n = torch.get_num_threads()
    with harness.torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == n
    res = encoder_bench(seq_lens=(16,), tokens=16, shape='tiny', modes=('concept',), reps=1, threads=1, memory=False,
                        progress=False)
    assert res['settings']['torch_threads'] == 1 and res['rows'][0]['peak_mb'] is None and torch.get_num_threads() == n


# ---- issue 20: figures that can be trusted (flags, repetitions until the ratio is stable, how stable it is)

def test_ratio_stability_is_a_t_interval_of_paired_log_ratios():
    assert ratio_stability([2.], [1.]) is None                       # one repetition: unknown
    assert ratio_stability([2., 4., 6.], [1., 2., 3.]) == 0           # the same ratio every time
    logs = [math.log(2.2), math.log(1.8)]                             # df = 1: t = 12.71
    sd = abs(logs[0] - logs[1]) / math.sqrt(2)
    assert ratio_stability([2.2, 1.8], [1., 1.]) == pytest.approx(math.exp(12.71 * sd / math.sqrt(2)) - 1)


def test_interleaved_times_repeats_until_the_ratio_is_stable(monkeypatch):
    monkeypatch.setattr(harness, 'time_call', lambda fn, device='cpu': fn())
    steady = {'base': iter([2.] * 50).__next__, 'x': iter([1.] * 50).__next__}
    assert [len(v) for v in interleaved_times(steady, 3, baseline='base', max_reps=20).values()] == [3, 3]
    noisy = {'base': iter([2., 1.] * 25).__next__, 'x': iter([1.] * 50).__next__}
    out = interleaved_times(noisy, 3, baseline='base', max_reps=12, tol=0.10)
    assert [len(v) for v in out.values()] == [12, 12]                 # never stable to +-10%: stops at max_reps
    assert [len(v) for v in interleaved_times(noisy, 2).values()] == [2, 2]   # without a baseline: exactly reps


def _row(N, model, t, flops, **kw):
    return dict(N=N, model=model, time_s=t, times_s=kw.pop('times', [t]), flops=flops, **kw)


def test_flags_mark_shares_above_the_ideal_and_unsteady_repetitions():
    # the README's step row at N=4096 before issue 20: 14.8x against a FLOP ideal of 8.48x (174%)
    rows = [_row(4096, 'bert_mlm', 4.51, 848, times=[4.4, 4.51, 4.6]),
            _row(4096, 'perceiver_mlm', 0.306, 100, flops_ideal=100, times=[0.3, 0.306, 0.31]),
            _row(512, 'bert_mlm', 1., 280, times=[1., 1., 1.3]),
            _row(512, 'perceiver_mlm', 0.36, 100, flops_ideal=100, times=[0.36, 0.36, 0.36])]
    add_flags(add_ratios(rows, 'bert_mlm', mem_key=None), 'bert_mlm')
    hi, base512, ok = rows[1], rows[2], rows[3]
    assert hi['share_of_ideal'] == pytest.approx(1.74, abs=0.01) and hi['flags'] == ['174% of FLOP ideal']
    assert base512['flags'] == ['spread 1.30'] and base512['ratio_pm'] is None
    assert ok['flags'] == ['ratio ±46%'] and ok['reps'] == 3 and ok['spread'] == 1
    printed = format_flags(rows)
    assert printed.splitlines()[0] == 'stability (95%): N=4096: 3 reps, speed-ups ±1%; N=512: 3 reps, speed-ups ±46%'
    assert 'SUSPECT  N=4096 perceiver_mlm: 174% of FLOP ideal' in printed
    res = dict(benchmark='step', settings=dict(device='cpu'), rows=rows)
    line = format_targets(check_targets(res)).splitlines()[1]
    assert line.startswith('PASS  perceiver_mlm training-step speed-up')
    assert line.endswith('[SUSPECT: 174% of FLOP ideal]')


def test_step_bench_records_repetitions_and_flags():
    res = step_bench(plan={16: ('bert_mlm', 'perceiver_mlm')}, tokens=16, shape='tiny', reps=2, max_reps=3,
                     progress=False)
    assert res['settings']['max_reps'] == 3 and res['settings']['tolerance'] == 0.10
    for r in res['rows']:
        assert 2 <= r['reps'] == len(r['times_s']) <= 3 and r['spread'] >= 1 and isinstance(r['flags'], list)
    assert res['rows'][1]['ratio_pm'] is not None and res['rows'][0]['ratio_pm'] is None
    assert bench.report(dict(res, machine=harness.machine_info())).count('stability (95%): N=16:') == 1


def test_busy_note():
    assert bench.busy_note(dict(cpu_count=2, loadavg=[0.9, 1, 1], loadavg_before=[0.5, 1, 1])) == ''
    assert bench.busy_note(dict(cpu_count=2, loadavg=[4.2, 1, 1])).startswith('BUSY MACHINE: 1-minute load 4.20')


def test_script_runs_as_users_run_it(tmp_path):
    "`python benchmarks/bench.py gpu --quick --device cpu`: the command `make bench` and `concept-nb bench` run."
    out = tmp_path / 'gpu.json'
    p = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench.py'), 'gpu', '--quick', '--device', 'cpu',
                        '--out', str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert '| model | params |' in p.stdout and 'perceiver_mlm real tokens/s on one GPU' in p.stdout
    rec = json.loads(out.read_text())
    assert rec['benchmark'] == 'gpu' and rec['quick'] and [r['model'] for r in rec['rows']][-1] == 'bert_mlm'


def test_cli_errors_in_one_line():
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^error: device='cuda': CUDA is not available"):
            main(['step', '--device', 'cuda'])
    with pytest.raises(SystemExit): main(['nonsense'])
