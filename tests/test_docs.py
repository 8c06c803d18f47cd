"The static docs site (concept_nb.docs.build_site, `python -m concept_nb.runs docs`) opened in headless Chromium."
import re, shutil, subprocess
from pathlib import Path

import pytest, yaml

from concept_nb.core import repo_root
from concept_nb.docs import build_site, site_pages, sidebar_yml
from concept_nb.cli import main

ROOT = repo_root(Path(__file__))
CHROMIUM = next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
                 if shutil.which(b)), None)
# The home page and one API page: 14_report documents its API with show_doc tables and draws matplotlib figures.
NOTEBOOKS = ['index.ipynb', '14_report.ipynb']


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')/'_docs'
    assert main(['docs', '--out', str(out), '--notebooks', *NOTEBOOKS]) == 0   # what `make docs` runs, on two pages
    return out


def _browser(*args, tmp):
    if CHROMIUM is None:
        pytest.skip("no Chromium found (Debian: apt-get install -y chromium); the browser check needs it")
    cmd = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync', '--hide-scrollbars',
           f'--user-data-dir={tmp}', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _dom(page:Path, tmp) -> str:
    r = _browser('--dump-dom', page.as_uri(), tmp=tmp)
    assert r.returncode == 0 and '<body' in r.stdout, r.stderr[-2000:]
    return r.stdout


def test_site_files(site):
    assert sorted(p.name for p in site.iterdir()) == ['index.html', 'report.html', 'site.css']
    html = (site/'report.html').read_text()
    assert '<script src="http' not in html and '<link rel="stylesheet" href="http' not in html   # works offline
    assert 'build-warning' not in html


def test_home_page_renders(site, tmp_path):
    dom = _dom(site/'index.html', tmp_path)
    assert '<title>concept_nb – concept_nb</title>' in dom
    assert 'make run' in dom and 'make test' in dom                       # the README content
    assert 'href="report.html"' in dom                                      # sidebar
    assert 'data-images-ok=' in dom and 'data-tables=' in dom             # the page's load handler ran


def test_api_page_renders_tables_and_plot(site, tmp_path):
    dom = _dom(site/'report.html', tmp_path)
    body = re.search(r'<body[^>]*>', dom).group(0)
    n_img, n_tab = (int(re.search(rf'{k}="(\d+)"', body).group(1)) for k in ('data-images-ok', 'data-tables'))
    assert n_img >= 2, 'the plot_compare and plot_rank_vs_glue figures decoded in the browser'
    assert n_tab >= 5
    assert re.search(r'<img[^>]+src="data:image/png;base64,', dom)
    # show_doc of run_notebook: heading anchor, signature and the parameter table
    m = re.search(r'id="run_notebook".*?<table>(.*?)</table>', dom, re.S)
    assert m, 'show_doc(run_notebook) with its parameter table'
    assert 'Details' in m.group(1) and 'runs_dir' in m.group(1) and 'folder of run records' in m.group(1)
    assert 'id="read_run"' in dom and 'id="experiment_log"' in dom
    shot = tmp_path/'runs.png'
    r = _browser(f'--screenshot={shot}', '--window-size=1280,1800', (site/'report.html').as_uri(), tmp=tmp_path)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    from PIL import Image
    im = Image.open(shot).convert('RGB')
    assert im.size == (1280, 1800) and len(im.getcolors(1_000_000) or []) > 50    # a rendered page, not a blank one


def test_pages_and_quarto_config():
    pages = site_pages(ROOT)
    by_src = {p['src']: p for p in pages}
    assert by_src['index.ipynb']['file'] == 'index.html' and by_src['14_report.ipynb']['section'] == 'API'
    assert by_src['14_report.ipynb']['file'] == 'report.html'
    for nb in ('90_pretrain.ipynb', '91_glue.ipynb', '92_report.ipynb'):
        if nb in by_src: assert by_src[nb]['section'] == 'Tutorials', nb
    assert len({p['file'] for p in pages}) == len(pages), 'no two notebooks share a page'
    if {'11_glue.ipynb', '91_glue.ipynb'} <= set(by_src):
        assert (by_src['11_glue.ipynb']['file'], by_src['91_glue.ipynb']['file']) == ('glue.html', '91_glue.html')
    nbs = ROOT/'nbs'
    q = yaml.safe_load((nbs/'_quarto.yml').read_text())
    assert q['project']['type'] == 'website' and 'sidebar.yml' in q['metadata-files']
    assert yaml.safe_load((nbs/'nbdev.yml').read_text())['project']['output-dir'] == '_docs'
    side = yaml.safe_load(sidebar_yml(ROOT))['website']['sidebar']['contents']
    assert side[0] == 'index.ipynb' and {'section': 'API'}.items() <= side[1].items()
    listed = {f for s in side[1:] for f in s['contents']} | {side[0]}
    assert listed == set(by_src), 'every notebook has a page'
