"The analytical FLOP model (`concept_nb.flops`): hand-computed counts and the ideal ratios."
import pytest
from concept_nb.flops import Shape, forward_flops, flop_ratio, get_shape, peak_tflops


def test_flops_hand_computed():
    s = Shape(hidden=4, layers=1, intermediate=8, concepts=2, heads=1, vocab=10)
    s2 = Shape(hidden=4, layers=2, intermediate=8, concepts=2, heads=1, vocab=10)
    # BERT layer, N=3: QKVO 8*N*H^2 = 384, attention 4*N^2*H = 144, FFN 4*N*H*I = 384
    assert forward_flops('bert', 3, s)['total'] == 912
    # concept layer: K,V of tokens 192 + cross-attention 96 + q,o 64+64 + self-attention (64+128+64+64)
    # + gated FFN (256+128)
    assert forward_flops('concept', 3, s)['total'] == 1120
    assert forward_flops('recursive', 3, s)['total'] == 1120
    # two layers double the encoder; the MLM head is H->H transform + H->V decoder at every position
    assert forward_flops('bert_mlm', 3, s2) == dict(encoder=1824, decoder=0, head=96 + 240, total=1824 + 336)
    # sparse head on 1 labelled row; ideal decoding runs the decoder block on that row only
    f_all = forward_flops('perceiver_mlm', 3, s, labelled=1)
    f_lab = forward_flops('perceiver_mlm', 3, s, labelled=1, decode='labelled')
    assert f_all['head'] == f_lab['head'] == 80
    assert f_lab['decoder'] == 32 + 128 + 32 + 32 + 128 + 64 and f_all['decoder'] == 96 + 128 + 96 + 96 + 384 + 192
    assert flop_ratio('concept', 3, s) == pytest.approx(912 / 1120)
    # BiXT: token work grows with N, the concept side does not; the last layer has no token update
    # per token: K,V 64 + cross 32 (+ in updating layers: tokens read concepts 16, o_x 32, token FFN 128 + 64)
    assert forward_flops('bixt', 6, s)['total'] - forward_flops('bixt', 3, s)['total'] == 3 * (64 + 32)
    assert forward_flops('bixt', 6, s2)['total'] - forward_flops('bixt', 3, s2)['total'] == \
        3 * (64 + 32 + 16 + 32 + 128 + 64) + 3 * (64 + 32)
    # a lone (last) BiXT layer costs what a concept layer does: rv_c H->H like q
    assert forward_flops('bixt', 3, s)['total'] == 1120
    with pytest.raises(ValueError, match='decode'): forward_flops('perceiver_mlm', 3, s, decode='some')
    with pytest.raises(ValueError, match='model'): forward_flops('gpt', 3, s)


def test_flop_ratio_grows_with_n():
    r = [flop_ratio('concept', N, 'l6') for N in (512, 2048, 8192)]
    assert r[0] < r[1] < r[2] and 1.9 < r[0] < 2.1
    assert 7 < flop_ratio('perceiver_mlm', 4096, 'l6', decode='labelled') < 8


def test_shapes_and_peaks():
    assert get_shape('cpu') == Shape(256, 2, 1024, 128, 4, 8000) and get_shape(get_shape('l6')) is get_shape('l6')
    with pytest.raises(ValueError, match='expected a Shape'): get_shape('huge')
    assert peak_tflops('NVIDIA H200') == 989.5 and peak_tflops('NVIDIA H200 NVL') == 835.0 and peak_tflops('x') is None
