"Concept analysis: rank formulas, upstream metric definitions, reports, plots and the real encoder's attention maps."
import io, json, math, os
os.environ.setdefault('MPLBACKEND', 'Agg')
import numpy as np, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from concept_nb.analysis import *
from concept_nb.health import *
from concept_nb.config import ConceptEncoderConfig
from concept_nb.encoder import ConceptEncoder
from concept_nb.heads import build_model


def with_singular_values(sv, n, k, seed=0):
    "An (n, k) float64 matrix with the given singular values (rest 0)."
    g = np.random.default_rng(seed)
    u, _ = np.linalg.qr(g.standard_normal((n, n))); v, _ = np.linalg.qr(g.standard_normal((k, k)))
    s = np.zeros((n, k)); s[range(len(sv)), range(len(sv))] = sv
    return torch.from_numpy(u @ s @ v.T)


@pytest.mark.parametrize('k', [1, 2, 4, 7])
def test_rank_k_construction_both_definitions(k):
    m = with_singular_values([3.0] * k, 8, 16, seed=k)
    assert nuclear_rank(m) == pytest.approx(k, abs=1e-6)           # sum(s)/max(s) = k*3/3
    assert rankme(m) == pytest.approx(k, abs=1e-3)                 # exp(entropy of k equal masses) = k
    # the same matrix as every sample of a batch: per-sample and batch-mean definitions agree
    met = concept_metrics(m.expand(3, 8, 16))
    for key in ('effective_rank', 'effective_rank_per_sample'): assert met[key] == pytest.approx(k, abs=1e-5)
    for key in ('rankme', 'rankme_per_sample'): assert met[key] == pytest.approx(k, abs=1e-3)


def test_unequal_spectrum_formulas():
    s = np.array([5.0, 3.0, 1.0, 0.5])
    m = with_singular_values(s, 6, 9)
    assert nuclear_rank(m) == pytest.approx(s.sum() / s.max(), rel=1e-7)
    p = np.concatenate([s, [0., 0.]]) / s.sum() + 1e-7                      # min(6, 9) = 6 singular values
    assert rankme(m) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    # exp(Shannon entropy) >= exp(min-entropy) = 1 / max p = sum(s) / max(s)
    assert 1 <= nuclear_rank(m) <= rankme(m) <= 4


def test_identical_concepts_similarity_one_rank_one():
    v = torch.randn(1, 1, 24)
    x = v.expand(5, 6, 24) * torch.linspace(0.5, 2, 5)[:, None, None]   # same direction, sample-dependent scale
    m = concept_metrics(x)
    assert m['mean_concept_similarity'] == pytest.approx(1, abs=1e-6)
    assert m['max_concept_similarity'] == pytest.approx(1, abs=1e-6)
    assert m['std_concept_similarity'] == pytest.approx(0, abs=1e-6)
    for key in ('effective_rank', 'effective_rank_per_sample', 'rankme', 'rankme_per_sample'):
        assert m[key] == pytest.approx(1, abs=1e-3), key
    assert m['dominance'] == pytest.approx(1, abs=1e-6)
    assert any(r.startswith('CRITICAL') for r in recommendations(m))


@pytest.mark.parametrize('C,H', [(4, 4), (8, 32), (16, 64)])
def test_orthonormal_concepts_rankme_equals_C(C, H):
    q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
    x = q[:C].expand(2, C, H)
    m = concept_metrics(x)
    assert m['rankme_per_sample'] == pytest.approx(C, abs=1e-3)
    assert m['rankme'] == pytest.approx(C, abs=1e-3)
    assert m['effective_rank'] == pytest.approx(C, abs=1e-5)
    assert m['mean_concept_similarity'] == pytest.approx(0, abs=1e-7)
    assert m['uniformity_loss'] == pytest.approx(math.exp(-4), rel=1e-6)


def upstream_reference(x):
    "The upstream definitions (reference text §6.1), written independently in numpy."
    x = np.asarray(x, dtype=np.float64); B, C, H = x.shape
    s = np.linalg.svd(x.mean(0), compute_uv=False)
    var = s ** 2 / ((s ** 2).sum() + 1e-8)
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    sim = np.einsum('bch,bdh->bcd', xn, xn)
    off = sim[:, ~np.eye(C, dtype=bool)]
    flat = x.reshape(B * C, H)
    lam = np.clip(np.linalg.eigvalsh(np.cov(flat.T)), 1e-8, None)
    std = flat.std(0, ddof=1); norms = np.linalg.norm(flat, axis=-1)
    return dict(effective_rank=s.sum() / (s.max() + 1e-8),
                effective_rank_normalized=s.sum() / (s.max() + 1e-8) / min(C, H),
                dimensions_for_95_variance=(np.cumsum(var) < 0.95).sum() + 1, top_1_variance_ratio=var[0],
                top_5_variance_ratio=var[:5].sum() if len(s) >= 5 else 1.0, dominance=s[0] / (s.sum() + 1e-8),
                max_concept_similarity=max(off.max(), 0.), mean_concept_similarity=np.abs(off).mean(),
                std_concept_similarity=off.std(ddof=1), uniformity_loss=np.exp(-2 * (2 - 2 * off)).mean(),
                isotropy=lam.min() / lam.max(), participation_ratio=lam.sum() ** 2 / (lam ** 2).sum(),
                participation_ratio_normalized=lam.sum() ** 2 / (lam ** 2).sum() / H,
                mean_dimension_std=std.mean(), min_dimension_std=std.min(), max_dimension_std=std.max(),
                collapsed_dimensions=(std < 1e-4).sum(), collapsed_dimensions_ratio=(std < 1e-4).sum() / H,
                mean_concept_norm=norms.mean(), std_concept_norm=norms.std(ddof=1), min_concept_norm=norms.min(),
                max_concept_norm=norms.max(),
                **{f'singular_value_{i+1}': (s[i] if i < len(s) else 0.) for i in range(5)})


@pytest.mark.parametrize('shape', [(5, 3, 8), (7, 6, 4), (3, 9, 12)])
def test_upstream_metrics_match_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g, dtype=torch.float64)
         + torch.randn(1, *shape[1:], generator=g, dtype=torch.float64))
    x[:, :, 0] = 0.5  # one collapsed dimension
    m, ref = concept_metrics(x), upstream_reference(x)
    assert set(ref) == set(UPSTREAM_KEYS)
    for k, v in ref.items(): assert m[k] == pytest.approx(float(v), rel=1e-6, abs=1e-9), k
    assert m['collapsed_dimensions'] == 1


def test_hand_computed_2x2():
    # c1 = (3, 0), c2 = (0, 4), orthogonal: sigma = (4, 3)
    m = concept_metrics(torch.tensor([[[3., 0.], [0., 4.]]]))
    assert m['effective_rank'] == pytest.approx(7 / 4)
    assert m['dominance'] == pytest.approx(4 / 7)
    assert m['top_1_variance_ratio'] == pytest.approx(16 / 25)
    assert m['uniformity_loss'] == pytest.approx(math.exp(-4))
    assert m['max_concept_similarity'] == 0 and m['mean_concept_similarity'] == 0
    # two unit vectors at 60 degrees: cos = 1/2; M = [[1, 0], [1/2, sqrt(3)/2]], sigma^2 = 1 +- 1/2
    m = concept_metrics(torch.tensor([[[1., 0.], [0.5, math.sqrt(3) / 2]]]))
    assert m['mean_concept_similarity'] == pytest.approx(0.5) and m['max_concept_similarity'] == pytest.approx(0.5)
    assert m['uniformity_loss'] == pytest.approx(math.exp(-2))
    s = np.sqrt([1.5, 0.5])
    assert m['effective_rank'] == pytest.approx(s.sum() / s[0])
    assert m['top_1_variance_ratio'] == pytest.approx(0.75)
    assert m['dimensions_for_95_variance'] == 2


def test_hand_computed_3x2():
    m = concept_metrics(torch.tensor([[[1., 0.], [1., 1.], [0., 1.]]]))
    assert m['effective_rank'] == pytest.approx(1 + 1 / math.sqrt(3))
    assert m['mean_concept_similarity'] == pytest.approx(math.sqrt(2) / 3)
    assert m['isotropy'] == pytest.approx(1 / 3)            # covariance eigenvalues 1/2 and 1/6
    assert m['participation_ratio'] == pytest.approx(1.6)


def test_negative_similarities_max_is_clamped_like_upstream():
    # two antipodal concepts: the only off-diagonal cosine is -1, upstream's max is 0 (zeroed diagonal)
    m = concept_metrics(torch.tensor([[[1., 0.], [-1., 0.]]]))
    assert m['max_concept_similarity'] == 0 and m['mean_concept_similarity'] == pytest.approx(1)


def test_grades_thresholds():
    rows = {r['metric']: r for r in grade_metrics(dict(effective_rank=45., effective_rank_normalized=0.71,
                                                       mean_concept_similarity=0.3, max_concept_similarity=0.59,
                                                       collapsed_dimensions_ratio=0.05, dominance=0.5))}
    assert 'global_effective_rank' not in rows                 # raw counts are not graded (issue 14, defect 7)
    assert rows['global_effective_rank_normalized']['grade'] == 'good'
    assert rows['mean_concept_similarity']['grade'] == 'ok'     # < 0.3 is good, 0.3 is not
    assert rows['max_concept_similarity']['grade'] == 'good'
    assert (rows['active_dimensions_ratio']['grade'] == 'ok'
            and rows['active_dimensions_ratio']['value'] == pytest.approx(.95))
    assert rows['dominance']['grade'] == 'poor'
    assert rows['mean_concept_similarity']['meets_target'] is False and rows['max_concept_similarity']['meets_target']


def fixed_slots(B=6, C=8, H=32, noise=1e-3, seed=0):
    "The same C well-spread slots for every one of B inputs (plus a little noise): (B, C, H)."
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, H, generator=g).expand(B, C, H) + noise * torch.randn(B, C, H, generator=g)


def test_input_independent_concepts_are_flagged_though_rankme_is_high():
    """issue 14, defect 7: identical concepts for every input (diverse across slots) keep RankMe near C, so the
    geometry report saw nothing; input dependence must be <= 0.05 and the grades and advice must flag it."""
    C = 8
    x = fixed_slots(C=C)
    g = {r['metric']: r['grade'] for r in grade_metrics(concept_metrics(x))}
    assert g.get('input_dependence') == 'poor'                     # today: no such row (None)
    assert any('input dependence' in r for r in recommendations(concept_metrics(x)))
    r = ConceptReport.from_concepts([x[:3], x[3:]])
    assert {row['metric']: row['grade'] for row in r.grades}.get('input_dependence') == 'poor'
    m = concept_metrics(x)
    assert m['rankme'] >= 0.8 * C and m['rankme_per_sample'] >= 0.8 * C
    assert m['input_dependence'] <= 0.05 and max(m['input_dependence_per_slot']) <= 0.05
    assert r.metrics['input_dependence'] <= 0.05 and len(r.metrics['input_dependence_per_slot']) == C


def test_input_dependent_concepts_score_high_per_slot():
    """issue 14, defect 7: concepts that change with every input score high; per slot, fixed slots score ~0 and
    input-driven ones high; one sample is undefined (nan, graded n/a; ValueError when asked for explicitly)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, 32, generator=g) + 0.3 * torch.randn(1, 8, 32, generator=g)   # input-driven plus a slot mean
    m = concept_metrics(x)
    assert {r['metric']: r['grade'] for r in grade_metrics(m)}.get('input_dependence') == 'good'
    assert m['input_dependence'] >= 0.8
    half = torch.cat([fixed_slots(16, 4), torch.randn(16, 4, 32, generator=g)], 1)   # slots 0-3 fixed, 4-7 not
    per = concept_metrics(half)['input_dependence_per_slot']
    assert max(per[:4]) < 1e-3 and min(per[4:]) > 0.5
    # the mean over slots is the within-slot share of the pooled (population) variance, computed independently
    xd = half.double().numpy()
    within = xd.var(0).sum(-1).mean(); total = xd.reshape(-1, 32).var(0).sum()
    assert concept_metrics(half)['input_dependence'] == pytest.approx(within / total, rel=1e-9)
    one = concept_metrics(x[:1])
    assert math.isnan(one['input_dependence']) and all(math.isnan(v) for v in one['input_dependence_per_slot'])
    assert {r['metric']: r['grade'] for r in grade_metrics(one)}['input_dependence'] == 'n/a'
    with pytest.raises(ValueError, match='B >= 2'): input_dependence(x[:1])


@pytest.mark.parametrize('noise', [0.0, 0.05])
def test_near_orthogonal_C16_not_graded_poor_on_ranks(noise):
    """issue 14, defect 7: upstream's raw-count thresholds (rank >= 40, 95%-dims >= 10, set for C = 128) graded
    near-orthogonal C = 16 concepts 'poor'; only values normalised by min(C, H) are graded now."""
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    x = q[:16] + noise * torch.randn(8, 16, 64, generator=g, dtype=torch.float64)    # (8, 16, 64)
    rows = grade_metrics(concept_metrics(x))
    ranks = {r['metric']: r['grade'] for r in rows if 'rank' in r['metric'] or 'dimensions_for' in r['metric']}
    assert ranks and all(v != 'poor' for v in ranks.values()), ranks    # today: global_effective_rank 'poor'
    assert ranks == {'global_effective_rank_normalized': 'good', 'dimensions_for_95_variance_normalized': 'good'}
    assert concept_metrics(x)['dimensions_for_95_variance_normalized'] >= 0.9
    # and a collapsed small set (one direction, C = 8) stays poor on both normalised rows
    one_dir = torch.randn(1, 1, 32, generator=g).expand(4, 8, 32) * torch.rand(4, 8, 1, generator=g)
    g2 = {r['metric']: r['grade'] for r in grade_metrics(concept_metrics(one_dir))}
    assert g2['global_effective_rank_normalized'] == g2['dimensions_for_95_variance_normalized'] == 'poor'


def test_report_json_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    r = ConceptReport.from_concepts([torch.randn(4, 5, 12, generator=g) for _ in range(3)], meta=dict(name='x', step=3))
    p = r.to_json(tmp_path / 'sub' / 'report.json')
    d = json.loads(p.read_text())
    assert d['n_samples'] == 12 and d['meta'] == dict(name='x', step=3) and 'concepts' not in d
    r2 = ConceptReport.from_json(p)
    assert r2 == r and r2.summary() == r.summary() and r2.concepts is None
    # nan metrics (C = 1 has no pairs) survive as null -> nan
    r1 = ConceptReport.from_concepts([torch.randn(3, 1, 4)])
    r1b = ConceptReport.from_json(r1.to_json(tmp_path / 'one.json'))
    assert (math.isnan(r1b.metrics['mean_concept_similarity'])
            and r1b.metrics['rankme'] == pytest.approx(r1.metrics['rankme']))
    with pytest.raises(FileNotFoundError): ConceptReport.from_json(tmp_path / 'missing.json')


def tiny_config(**kw):
    return ConceptEncoderConfig(**{**dict(vocab_size=50, concept_num=6, hidden_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=32, max_sequence_length=64,
                                          pad_token_id=0, mask_token_id=1), **kw})


def padded_batch(lengths, N=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (len(lengths), N), generator=g)
    am = (torch.arange(N)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(am == 0, 0), am


@pytest.mark.parametrize('variant', [{}, dict(use_bixt=True), dict(num_iterations=3)])
def test_real_encoder_attention_rows_sum_to_one_and_zero_on_padding(variant):
    torch.manual_seed(0)
    enc = ConceptEncoder(tiny_config(**variant)).eval()
    ids, am = padded_batch([20, 13, 5, 1])
    with torch.no_grad(): out = enc(ids, am, output_attentions=True)
    assert len(out.attentions) == enc.config.effective_depth
    for a in out.attentions:
        assert a.shape == (4, 2, 6, 20)
        torch.testing.assert_close(a.sum(-1), torch.ones(4, 2, 6), atol=1e-5, rtol=0)
        assert (a.masked_select(am[:, None, None, :] == 0) == 0).all()
    m = attention_map(out.attentions, sample=2)
    torch.testing.assert_close(m[:, :5].sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    assert (m[:, 5:] == 0).all()


def test_report_from_real_model_streams_batches():
    torch.manual_seed(0)
    model = build_model('perceiver_mlm', tiny_config())
    batches = [dict(zip(('input_ids', 'attention_mask'), padded_batch([20, 9, 4], seed=s)), labels=None)
               for s in range(5)]
    r = ConceptReport.from_model(model, iter(batches), max_batches=3)
    assert (r.n_batches, r.n_samples, r.concept_num, r.hidden_size) == (3, 9, 6, 16)
    assert model.training                                             # mode restored after the report
    with torch.no_grad():
        model.eval()
        c = torch.cat([model.encoder(b['input_ids'], b['attention_mask']).last_hidden_state for b in batches[:3]])
    assert r.metrics['rankme'] == pytest.approx(concept_metrics(c)['rankme'], rel=1e-4)
    # the encoder alone gives the same report
    r2 = ConceptReport.from_model(model.encoder, batches, max_batches=3)
    per, per2 = (x.metrics.pop('input_dependence_per_slot') for x in (r, r2))   # pytest.approx takes no lists in dicts
    assert r2.metrics == pytest.approx(r.metrics) and per2 == pytest.approx(per) and len(per) == 6
    with pytest.raises(ValueError, match='input_ids'): ConceptReport.from_model(model, [torch.zeros(2, 3)])


def test_plots_render_with_agg():
    assert matplotlib.get_backend().lower() == 'agg'
    torch.manual_seed(0)
    enc = ConceptEncoder(tiny_config()).eval()
    ids, am = padded_batch([20, 12, 7])
    with torch.no_grad(): out = enc(ids, am, output_attentions=True)
    c = out.last_hidden_state
    r = ConceptReport.from_concepts([c], meta=dict(name='a'))
    hist = [dict(step=s, **{f'eval/{k}': v for k, v in concept_metrics(c * (s + 1)).items()}) for s in range(3)]
    toks = [f't{i}' for i in range(12)]
    figs = [plot_similarity_heatmap(c, sample=1), plot_similarity_heatmap(c, average='concepts'), plot_svd_spectrum(c),
            plot_concept_pca(c), plot_attention_map(out.attentions, toks, sample=1),
            plot_attention_map(out.attentions, layer='mean'), plot_concept_usage(out.attentions, toks, sample=1),
            plot_training_dynamics(hist),
            plot_report_comparison(r, ConceptReport.from_concepts([torch.randn(3, 6, 16)]))]
    for f in figs:
        assert isinstance(f, plt.Figure)
        buf = io.BytesIO(); f.savefig(buf, format='png'); assert buf.tell() > 1000
    # drawing into given axes
    fig, ax = plt.subplots()
    assert plot_svd_spectrum(c, ax=ax) is fig
    plt.close('all')


def test_health_check_flags_broken_models():
    from concept_nb.data import load_tokenizer
    tok = load_tokenizer('embedded')
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id,
                      hidden_size=32)
    texts = list(FALLBACK_SENTENCES)
    for name in ('perceiver_mlm', 'diffusion_mlm'):
        model = build_model(name, cfg)
        st = health_check(model, tok, texts).set_index('check').status
        assert (st.drop('concept_geometry') == 'pass').all(), (name, st)
        with torch.no_grad(): next(model.encoder.parameters()).mul_(1e4)
        st = health_check(model, tok, texts).set_index('check').status
        assert st['parameter_magnitude'] == 'fail'


class _Stream:
    "The part of concept_nb.train.BatchStream that `evaluate` uses."
    def __init__(self, batches): self.batches = batches
    def batch(self, k, rank=0, world=1): return self.batches[k]


def test_training_log_and_run_metrics_carry_input_dependence():
    """issue 14, defect 7: the eval records of concept_nb.train and the run's headline metrics (metrics.json, read by
    the experiment log) carry input dependence, per slot and its mean."""
    from concept_nb import train as T
    logged = {f'concept/{k}': v for k, v in concept_metrics(fixed_slots()).items()}   # what `evaluate` records
    rec = dict(kind='eval', step=5, eval_loss=1.0, **logged)
    from concept_nb.records import History
    h = History([rec]); h.step = 5
    m = T.run_metrics(h, dict(run_name='fixed'))['results']
    assert m.get('input_dependence') is not None and m['input_dependence'] <= 0.05     # today: not in the metrics
    assert m['input_dependence_min'] <= m['input_dependence']
    torch.manual_seed(0)
    model = build_model('perceiver_mlm', tiny_config())
    batches = []
    for s in range(2):
        ids, am = padded_batch([20, 11, 6], seed=s)
        batches.append(dict(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)))
    res = T.evaluate(model, _Stream(batches), n_batches=2)
    assert 0 <= res['concept/input_dependence'] <= 1 and len(res['concept/input_dependence_per_slot']) == 6
    assert '| input dep.' in T._fmt_eval(dict(res, step=0))


def test_health_command_line(tmp_path, capsys):
    ("`concept-nb health` (formerly analysis.health_main): 0 on a healthy checkpoint, "
     "1 on a broken one or a missing path.")
    from concept_nb.cli import main
    from concept_nb.data import load_tokenizer
    tok = load_tokenizer('embedded')
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id,
                      hidden_size=32)
    model = build_model('perceiver_mlm', cfg)
    d = tmp_path / 'run' / 'model'
    model.save_pretrained(d); tok.save_pretrained(d)
    assert main(['health', str(tmp_path / 'run')]) == 0                  # a run folder means its final model
    with torch.no_grad(): next(model.encoder.parameters()).mul_(1e4)
    model.save_pretrained(d)
    assert main(['health', str(d), '--tokenizer', 'embedded']) == 1
    assert main(['health', str(tmp_path / 'nonexistent')]) == 1
    assert 'does not exist' in capsys.readouterr().err
