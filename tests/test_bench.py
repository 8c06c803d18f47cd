"CI-sized benchmarks (tiny shapes, one repetition): record structure, positive times, ratio columns, FLOP formulas."
import json
import pytest, torch
from concept_nb import bench
from concept_nb.bench import (Shape, STEP_MODELS, forward_flops, flop_ratio, encoder_bench, step_bench, packing_bench,
                              gpu_bench, add_ratios, check_targets, format_table, format_targets, main, peak_memory,
                              rss_peak_supported, mlm_batch, ENCODER_COLUMNS)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny ops on a shared 2-core machine: a second OpenMP thread only adds waiting. Restored afterwards."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(rows, N, model):
    return next(r for r in rows if r['N'] == N and r['model'] == model)


def test_flops_hand_computed():
    s = Shape(hidden=4, layers=1, intermediate=8, concepts=2, heads=1, vocab=10)
    s2 = Shape(hidden=4, layers=2, intermediate=8, concepts=2, heads=1, vocab=10)
    # BERT layer, N=3: QKVO 8*N*H^2 = 384, attention 4*N^2*H = 144, FFN 4*N*H*I = 384
    assert forward_flops('bert', 3, s)['total'] == 912
    # concept layer: K,V of tokens 192 + cross-attention 96 + q,o 64+64 + self-attention (64+128+64+64) + gated FFN (256+128)
    assert forward_flops('concept', 3, s)['total'] == 1120
    assert forward_flops('recursive', 3, s)['total'] == 1120
    # two layers double the encoder; the MLM head is H->H transform + H->V decoder at every position
    assert forward_flops('bert_mlm', 3, s2) == dict(encoder=1824, decoder=0, head=96 + 240, total=1824 + 336)
    # sparse head on 1 labelled row; ideal decoding runs the decoder block on that row only
    f_all, f_lab = forward_flops('perceiver_mlm', 3, s, labelled=1), forward_flops('perceiver_mlm', 3, s, labelled=1, decode='labelled')
    assert f_all['head'] == f_lab['head'] == 80
    assert f_lab['decoder'] == 32 + 128 + 32 + 32 + 128 + 64 and f_all['decoder'] == 96 + 128 + 96 + 96 + 384 + 192
    assert flop_ratio('concept', 3, s) == pytest.approx(912 / 1120)
    # BiXT: token work grows with N, the concept side does not; the last layer has no token update
    # per token: K,V 64 + cross 32 (+ in updating layers: tokens read concepts 16, o_x 32, token FFN 128 + 64)
    assert forward_flops('bixt', 6, s)['total'] - forward_flops('bixt', 3, s)['total'] == 3 * (64 + 32)
    assert forward_flops('bixt', 6, s2)['total'] - forward_flops('bixt', 3, s2)['total'] == 3 * (64 + 32 + 16 + 32 + 128 + 64) + 3 * (64 + 32)
    assert forward_flops('bixt', 3, s)['total'] == 1120   # a lone (last) BiXT layer costs what a concept layer does: rv_c H->H like q
    with pytest.raises(ValueError, match='decode'): forward_flops('perceiver_mlm', 3, s, decode='some')
    with pytest.raises(ValueError, match='model'): forward_flops('gpt', 3, s)


def test_flop_ratio_grows_with_n():
    r = [flop_ratio('concept', N, 'l6') for N in (512, 2048, 8192)]
    assert r[0] < r[1] < r[2] and 1.9 < r[0] < 2.1
    assert 7 < flop_ratio('perceiver_mlm', 4096, 'l6', decode='labelled') < 8


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
               rows=[dict(N=512, model='concept', speedup=5.5, flop_ratio=2.), dict(N=4096, model='concept', speedup=10., flop_ratio=9.),
                     dict(N=8192, model='concept', mem_ratio=4.)])
    assert [t['status'] for t in check_targets(res)] == ['PASS', 'MISS', 'MISS']
    assert format_targets(check_targets(res)).splitlines()[0].startswith('PASS  encoder fwd+bwd speed-up vs BertModel at N=512')
    pk = dict(benchmark='packing', settings={}, rows=[dict(block=128, mode='packed', real_share=0.999), dict(block=128, mode='x', real_share=0.4)])
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
    assert [(r['N'], r['model']) for r in res['rows']] == [(16, m) for m in STEP_MODELS] + [(32, m) for m in STEP_MODELS[:2]]
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
    with pytest.raises(ValueError, match='bert_mlm'): step_bench(plan={16: ('perceiver_mlm',)}, shape='tiny', progress=False)


def test_mlm_batch_labels_only_masked_positions():
    b = mlm_batch(3, 20, 50, seed=1)
    lab = b['labels'] != -100
    assert lab.sum(1).tolist() == [3, 3, 3] and (b['input_ids'][lab] == bench.MASK).all() and (b['input_ids'][~lab] > bench.MASK).all()


def test_packing_bench_small():
    res = packing_bench(block_sizes=(128, 512), batch=4, max_docs=30, progress=False)
    assert [(r['block'], r['mode'].split(',')[0]) for r in res['rows']] == \
        [(b, m) for b in (128, 512) for m in ('packed', 'one doc / seq', 'one doc / seq')]
    for b in (128, 512):
        packed, upstream, dynamic = [r for r in res['rows'] if r['block'] == b]
        assert 0 < upstream['real_share'] <= dynamic['real_share'] <= 1 and upstream['real_share'] < packed['real_share'] <= 1
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
    res = step_bench(plan={16: ('bert_mlm', 'perceiver_mlm')}, tokens=16, shape='tiny', reps=1, profile=True, progress=False)
    assert [b['model'] for b in res['breakdown']] == ['bert_mlm', 'perceiver_mlm']
    for b in res['breakdown']:
        assert b['step'] > 0 and b['encoder'] > 0
        assert b['encoder'] + b['decoder'] + b['head_loss'] + b['optimizer'] == pytest.approx(b['step'])
    ops = res['profile']['perceiver_mlm']
    assert ops and all(o['self_ms'] >= 0 and o['calls'] >= 1 for o in ops) and 0 < sum(o['share'] for o in ops) <= 1.001


def test_torch_threads_restores():
    n = torch.get_num_threads()
    with bench.torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == n
    res = encoder_bench(seq_lens=(16,), tokens=16, shape='tiny', modes=('concept',), reps=1, threads=1, memory=False, progress=False)
    assert res['settings']['torch_threads'] == 1 and res['rows'][0]['peak_mb'] is None and torch.get_num_threads() == n
