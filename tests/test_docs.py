"The docs site (concept_nb.docs.build_docs, `make docs`) opened in headless Chromium."
import json, re, shutil, subprocess
from pathlib import Path

import pytest, yaml

from concept_nb.core import repo_root
from concept_nb.docs import build_docs

ROOT = repo_root(Path(__file__))
CHROMIUM = next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
                 if shutil.which(b)), None)
# The home page and one API page: 03_losses documents its API with show_doc tables and commits a matplotlib figure.
NOTEBOOKS = ['index.ipynb', '05_losses.ipynb']


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    # n_workers=1: nbdev's processors run the notebooks' export cells in a worker process, not in the test process
    return build_docs(tmp_path_factory.mktemp('site')/'_docs', notebooks=NOTEBOOKS, n_workers=1, quiet=True)


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
    names = {p.name for p in site.iterdir()}
    assert {'index.html', 'losses.html', 'search', 'katex', 'assets'} <= names, names
    assert any(n.startswith('losses_') and n.endswith('.png') for n in names), 'the committed figure, as a file'
    for page in ('index.html', 'losses.html'):
        html = (site/page).read_text()
        assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', html), 'works offline: no CDN'
        assert 'github.com' not in html, 'no source links while settings.ini has source_links = False'
    idx = json.loads((site/'search'/'search_index.json').read_text())
    assert any('losses.html' in d['location'] for d in idx['docs']), 'the search index covers the API page'


def test_home_page_renders_math_and_search(site, tmp_path):
    dom = _dom(site/'index.html', tmp_path)
    assert 'make run' in dom and 'make test' in dom                       # the README content
    assert 'href="losses.html"' in dom                                    # navigation
    assert 'md-search__input' in dom                                      # search box
    assert dom.count('class="katex"') >= 3, 'KaTeX rendered $C$, $C \\cdot N$ and $N^2$'
    assert not re.search(r'\$C \\cdot N\$|\$N\^2\$|\\\(C', dom), 'no raw TeX left on the home page'


def test_api_page_renders_tables_and_plot(site, tmp_path):
    dom = _dom(site/'losses.html', tmp_path)
    body = re.search(r'<body[^>]*>', dom).group(0)
    n_img, n_tab = (int(re.search(rf'{k}="(\d+)"', body).group(1)) for k in ('data-images-ok', 'data-tables'))
    assert n_img >= 1, 'the plot_loss_profile figure decoded in the browser'
    assert n_tab >= 3
    # show_doc of plot_loss_profile: heading anchor, signature and the parameter table
    m = re.search(r'id="plot_loss_profile".*?<table>(.*?)</table>', dom, re.S)
    assert m, 'show_doc(plot_loss_profile) with its parameter table'
    assert 'Details' in m.group(1) and 'names' in m.group(1) and 'losses to show' in m.group(1)
    assert 'id="register_loss"' in dom
    shot = tmp_path/'losses.png'
    r = _browser(f'--screenshot={shot}', '--window-size=1280,1800', (site/'losses.html').as_uri(), tmp=tmp_path)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    from PIL import Image
    im = Image.open(shot).convert('RGB')
    assert im.size == (1280, 1800) and len(im.getcolors(1_000_000) or []) > 50    # a rendered page, not a blank one


def test_quarto_config_lists_every_notebook():
    nbs = ROOT/'nbs'
    q = yaml.safe_load((nbs/'_quarto.yml').read_text())
    assert q['project']['type'] == 'website' and 'sidebar.yml' in q['metadata-files']
    assert yaml.safe_load((nbs/'nbdev.yml').read_text())['project']['output-dir'] == '_docs'
    side = yaml.safe_load((nbs/'sidebar.yml').read_text())['website']['sidebar']['contents']
    assert side[0] == 'index.ipynb' and {'section': 'API'}.items() <= side[1].items()
    listed = {f for s in side[1:] for f in s['contents']} | {side[0]}
    on_disk = {p.name for p in nbs.glob('*.ipynb')}
    assert listed == on_disk, 'nbs/sidebar.yml is stale: `make docs` rewrites it'
    mk = yaml.safe_load((nbs/'mkdocs.yml').read_text())
    assert mk['theme']['name'] == 'material' and 'search' in mk['plugins']
