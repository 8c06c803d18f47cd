"Issue 16: the context-free floor, held-out MLM losses by position type, standard errors, seeds and noise marking."
import math
import pandas as pd
import pytest
import torch
from concept_nb.controls import MLMEvalStats, context_free_floor, mean_se, token_counts
from concept_nb.registry import config_key, group_seeds
from concept_nb.report import noise_verdict, run_differences


class Tok:
    "[PAD] [MASK] a b c d: two special tokens, K = 4 candidates."
    all_special_ids, mask_token_id, pad_token_id = [0, 1], 1, 0
    def __len__(self): return 6


def brute_force(q:dict, p:dict, m:float, r:float) -> dict:
    "Expected loss per shown-token type of the Bayes predictor under prior q, labels from p, by enumeration."
    k, K = 1 - m - r, len(q)
    def post(y, v): return q[y] * (k * (y == v) + r / K) / sum(q[u] * (k * (u == v) + r / K) for u in q)
    return dict(masked=sum(p[y] * -math.log(q[y]) for y in p),
                kept=sum(p[y] * -math.log(post(y, y)) for y in p),
                random=sum(p[y] * sum(-math.log(post(y, v)) for v in q) / K for y in p) if r else math.nan)


@pytest.mark.parametrize('m,r', [(0.8, 0.1), (0.5, 0.3), (0.9, 0.0)])
def test_floor_on_a_hand_computed_corpus(m, r):
    # training split 'a a a b' -> add-1/2 counts (3.5, 1.5, .5, .5) / 6; held-out labels a, b, c once each
    fl = context_free_floor(Tok(), torch.tensor([0, 0, 3., 1, 0, 0]), m, r)
    q, p = {2: 7 / 12, 3: 3 / 12, 4: 1 / 12, 5: 1 / 12}, {2: 1 / 3, 3: 1 / 3, 4: 1 / 3}
    e, want = fl.expected(torch.tensor([0, 0, 1., 1, 1, 0])), brute_force(q, p, m, r)
    assert e['masked'] == pytest.approx(-(math.log(7 / 12) + math.log(3 / 12) + math.log(1 / 12)) / 3, abs=1e-12)
    assert e['kept'] == pytest.approx(want['kept'], abs=1e-9)
    if r: assert e['random'] == pytest.approx(want['random'], abs=1e-9)
    else: assert math.isnan(e['random']) and e['kept'] == pytest.approx(0, abs=1e-12)   # no random: copying is exact
    parts = [(m, e['masked']), (r, e['random']), (1 - m - r, e['kept'])]
    assert e['all'] == pytest.approx(sum(w * x for w, x in parts if w), abs=1e-9)
    # per position: [MASK] is unigram, a kept token is hedged copying, a random one pays for the hedge
    shown, labels = torch.tensor([1, 3, 2]), torch.tensor([2, 3, 3])
    k, b = 1 - m - r, r / 4
    nll = fl.nll(labels, shown)
    assert nll[0].item() == pytest.approx(-math.log(7 / 12))
    assert nll[1].item() == pytest.approx(-math.log(q[3] * (k + b) / (k * q[3] + b)))
    if r: assert nll[2].item() == pytest.approx(-math.log(q[3] * b / (k * q[2] + b)))


def test_token_counts_of_a_dataset_equal_those_of_its_rows():
    from datasets import Dataset
    rows = [dict(input_ids=[3, 2, 2, 0], attention_mask=[1, 1, 1, 0]),
            dict(input_ids=[4, 1, 5, 5], attention_mask=[1] * 4)]
    c = token_counts(Tok(), Dataset.from_list(rows), chunk=1)
    assert torch.equal(c, token_counts(Tok(), rows)) and c.tolist() == [0, 0, 2, 1, 1, 2]   # no pad, no [MASK]


def test_held_out_loss_split_by_position_type():
    V, lv = 6, math.log(6)
    labels = torch.tensor([[-100, 2, -100, 3, 4], [5, -100, -100, -100, -100], [-100] * 5])   # row 2: none
    inp = torch.tensor([[2, 1, 3, 1, 4], [2, 0, 0, 0, 0], [2, 3, 4, 5, 0]])   # [MASK] [MASK] kept | random
    lg = torch.zeros(4, V); lg[0, 2] = 40.; lg[3, 3] = 40.   # right at [MASK] #1, wrong at the random row
    st = MLMEvalStats(1, context_free_floor(Tok(), torch.tensor([0, 0, 3., 1, 0, 0])))
    st.add(lg, labels, inp)
    s = st.summary()
    assert s['eval_mlm_loss_masked'] == pytest.approx(lv / 2, abs=1e-6)
    assert s['eval_mlm_loss_all'] == pytest.approx((0 + 2 * lv + 40) / 4, abs=1e-4)
    assert (s['eval_mlm_positions_masked'], s['eval_mlm_positions_all']) == (2, 4)
    assert s['eval_mlm_loss_masked_se'] == pytest.approx(lv / 2, abs=1e-6)         # s = lv / sqrt(2), n = 2
    assert s['eval_mlm_loss_all_se'] == pytest.approx(mean_se(torch.tensor([0, lv, lv, 40.]))[1], rel=1e-4)
    assert s['floor_masked'] == pytest.approx(-(math.log(7 / 12) + math.log(3 / 12)) / 2)
    assert s['below_floor_masked'] == pytest.approx(s['floor_masked'] - s['eval_mlm_loss_masked'], abs=1e-9)
    st2 = MLMEvalStats(1, st.floor); st2.add(lg[:3], labels[:1], inp[:1]); st2.add(lg[3:], labels[1:], inp[1:])
    assert st2.summary() == pytest.approx(s)                                 # batch by batch = all at once


def test_standard_error():
    x = torch.tensor([1., 2., 3., 4.])
    assert mean_se(x) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))
    st = MLMEvalStats(1)
    st.add(torch.zeros(4, 6), torch.tensor([[2, 3, 4, 5]]), torch.tensor([[1, 1, 1, 1]]))   # four equal losses
    assert st.summary()['eval_mlm_loss_masked_se'] == pytest.approx(0, abs=1e-7)


def test_seed_grouping():
    p = dict(lr=1e-3, hidden_size=32, steps=10, seed=1, run_name='a', run_dir='/r/a')
    assert config_key(p) == config_key({**p, 'seed': 7, 'run_name': 'b', 'run_dir': '/r/b'})
    for k, v in (('lr', 2e-3), ('hidden_size', 64), ('steps', 11), ('objective', 'tsdae')):
        assert config_key(p) != config_key({**p, k: v}), k
    rows = [dict(run_id=i, kind='pretrain', status=s, params_json={'params': q}, run_json={}, parameters={},
                 source_run_id=None, source_run=None)
            for i, s, q in (('x1', 'completed', p), ('x2', 'completed', {**p, 'seed': 2}),
                            ('y', 'completed', {**p, 'lr': 1}), ('x3', 'failed', {**p, 'seed': 3}))]
    assert sorted(map(sorted, group_seeds(pd.DataFrame(rows)).values())) == [['x1', 'x2'], ['y']]


def _row(rid, **kw):
    return dict(dict(run_id=rid, run_name=rid, kind='pretrain', status='completed', date='2026-01-01', start_time=rid,
                     glue={}, glue_best={}, metrics={}, parameters={}, params_json={'params': {'lr': rid}}, run_json={},
                     source_run_id=None, source_run=None, control=None), **kw)


def test_compare_marks_differences_within_noise():
    assert (noise_verdict(0.01, 0.02), noise_verdict(0.03, 0.02), noise_verdict(1, None)) == \
        ('within noise', 'beyond noise', 'no spread known (one seed)')
    df = pd.DataFrame([_row('a', below_floor_masked=0.10, below_floor_masked_se=0.01),
                       _row('b', below_floor_masked=0.125, below_floor_masked_se=0.01),
                       _row('c', below_floor_masked=0.16, below_floor_masked_se=0.01)])
    d = run_differences(df, [df.iloc[0], df.iloc[1], df.iloc[2]]).set_index('run')
    assert d.loc['b', 'verdict'] == 'within noise' and d.loc['c', 'verdict'] == 'beyond noise'   # 2 sqrt(2) 0.01 = .028


def test_headline_shows_the_distance_to_the_floor():
    from concept_nb.report import headline
    h = headline(dict(kind='pretrain', status='completed', task_loss=6.3, below_floor_masked=0.1,
                      below_floor_masked_se=0.01))
    assert 'task loss 6.3 · below context-free floor 0.1 ± 0.01' in h
