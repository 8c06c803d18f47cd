"""The GPU script of issue 20 on a CPU: its bundle check, and `benchmarks/gpu_run.sh --dry-run`, which runs every
section (bundle check, SDPA kernel, throughput, encoder scaling, a pretraining run, torch.compile) at tiny sizes."""
import json, os, subprocess, sys, tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import gpu_run  # noqa: E402

KINDS = """| pip list, as a session saw it | one session's list,
filtered by the names it asked for: accelerate 1.15.0, numpy 2.5.2, torch 2.11.0 |

## Python packages already there

nvidia-h200: their image holds these. Packages: accelerate, dill, numpy, pyyaml, torch, transformers.
"""


def test_image_packages_and_bundle_check(tmp_path):
    kinds = tmp_path / 'KINDS.md'; kinds.write_text(KINDS)
    assert gpu_run.image_packages(kinds) == dict(accelerate='1.15.0', dill=None, numpy='2.5.2', pyyaml=None,
                                                 torch='2.11.0', transformers=None)
    man = tmp_path / 'wheels.txt'; man.write_text('# carried\ndatasets==5.2.0\nnumpy==2.5.2\ntorch==2.13.0\n')
    wheels = tmp_path / 'w'; wheels.mkdir()
    for w in ('datasets-5.2.0-py3-none-any.whl', 'numpy-2.5.2-cp312-cp312-manylinux_2_28_x86_64.whl',
              'torch-2.13.0-cp312-none-any.whl', 'tqdm-4.0-py3-none-any.whl'):
        (wheels / w).touch()
    r = gpu_run.check_bundle(man, wheels, kinds)
    assert not r['ok'] and r['wheels_checked'] and [x['image'] for x in r['rows']] == ['absent', '2.5.2', '2.11.0']
    assert r['problems'] == ["numpy: 2.5.2 is already in the image; do not carry it",
                             "torch: never carried (the GPU image's own build is used)",
                             "tqdm: wheel not in the manifest"]
    man.write_text('datasets==5.2.0\n')
    assert gpu_run.check_bundle(man, tmp_path / 'none', kinds)['ok']


def test_the_committed_manifest_fits_the_gpu_image():
    kinds = Path('/work/.library/device/KINDS.md')
    r = gpu_run.check_bundle(ROOT / 'benchmarks' / 'gpu_wheels.txt', ROOT / '.gpu_bundle' / 'wheels', kinds)
    assert r['ok'], r['problems']
    if kinds.is_file(): assert all(x['image'] == 'absent' for x in r['rows'])


def test_dry_run(tmp_path):
    p = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_run.sh'), '--dry-run', '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHON': sys.executable})
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert 'skipping the wheel and project install' in p.stdout
    with tarfile.open(tmp_path / 'gpu_results.tar.gz') as t:
        names = t.getnames()
        read = lambda n: json.loads(t.extractfile(f'gpu_results/{n}').read())
        summary, thr, comp = read('summary.json'), read('throughput.json'), read('compile.json')
        pre = read('pretrain.json')
    assert summary['dry_run'] and summary['status'] == {s: 'ok' for s in gpu_run.SECTIONS}
    assert [(r['N'], r['model']) for r in thr] == [(N, m) for N in (32, 64) for m in ('perceiver_mlm', 'bert_mlm')]
    assert all(r['tokens_per_s'] > 0 and r['mfu'] > 0 and r['mfu_of_measured'] > r['mfu'] for r in thr)
    assert {r['compile'] for r in comp} == {'eager'}
    assert pre['status'] == 'completed' and pre['train']['steps'] == 4 and pre['steady_tokens_per_s'] is None
    assert pre['params']['wandb_mode'] == 'disabled'
    run = [n for n in names if n.endswith('/metrics.json') and '/runs/' in n]
    assert len(run) == 1 and not any('/checkpoints' in n or '/model' in n for n in names)   # records, no weights
    assert (tmp_path / 'summary.md').is_file()
