// The convolution page: builds the grids from the embedded data and moves the windows.
// Every output number comes from the data Python computed; the script multiplies window by filter only to show
// the products, and reports (on the console and in <html data-mismatches>) any sum that disagrees with Python.
(function () {
  'use strict';
  var DATA = JSON.parse(document.getElementById('cnnlab-data').textContent);
  var F = DATA.kernel, POOL = DATA.pool;
  var PLAY_MS = 900;
  var $ = function (id) { return document.getElementById(id); };
  var S = { ex: null, res: null, stride: 1, padding: 1, step: 0, timer: null,
            poolMap: 0, poolStep: 0, poolTimer: null, mismatches: 0 };

  function num(v) { return String(v); }
  function paren(v) { return v < 0 ? '(' + v + ')' : String(v); }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // A table of rows x cols cells; fill(td, r, c) sets each cell. Returns the table and its cells.
  function grid(rows, cols, caption, fill, small) {
    var table = el('table', small ? 'grid small' : 'grid');
    table.appendChild(el('caption', '', caption));
    var cells = [];
    for (var r = 0; r < rows; r++) {
      var tr = table.insertRow(), line = [];
      for (var c = 0; c < cols; c++) {
        var td = tr.insertCell();
        fill(td, r, c);
        line.push(td);
      }
      cells.push(line);
    }
    return { table: table, cells: cells };
  }

  // Grey for input levels (dark = high), sky blue for negative and yellow for positive signed values.
  function greyFor(v, max) {
    var light = 100 - 45 * (max > 0 ? v / max : 0);
    return 'hsl(0, 0%, ' + light.toFixed(1) + '%)';
  }
  function signedFor(v, maxAbs) {
    if (!v || !maxAbs) return '#fff';
    var a = (0.15 + 0.75 * Math.abs(v) / maxAbs).toFixed(2);
    return v < 0 ? 'rgba(86, 180, 233, ' + a + ')' : 'rgba(240, 228, 66, ' + a + ')';
  }
  function maxAbs(nested) {
    var m = 0;
    (function walk(a) { a.forEach(function (v) { if (Array.isArray(v)) walk(v); else m = Math.max(m, Math.abs(v)); }); })(nested);
    return m;
  }

  function dims(rows, cols, depth) { return rows + ' \u00d7 ' + cols + ' \u00d7 ' + depth; }

  // ---------------------------------------------------------------------------------------------- convolution

  function shape() {
    var x = S.ex.x, out = S.res.out;
    return { C: x.length, H: x[0].length, W: x[0][0].length, K: out.length, Ho: out[0].length, Wo: out[0][0].length };
  }

  function padded(c, r, col) {  // the zero-padded input at padded row r, column col
    var p = S.padding, x = S.ex.x[c];
    var rr = r - p, cc = col - p;
    return (rr >= 0 && rr < x.length && cc >= 0 && cc < x[0].length) ? x[rr][cc] : 0;
  }

  function sizeText(n, p, s, out, what) {
    var text = '(' + what + ' \u2212 F + 2P) / S + 1 = (' + n + ' \u2212 ' + F + ' + 2\u00b7' + p + ') / ' + s +
               ' + 1 = ' + out;
    var left = (n - F + 2 * p) % s;
    if (left) text += ' (rounded down: the last ' + left + ' padded ' + (what === 'W' ? 'column' : 'row') +
                      (left > 1 ? 's are' : ' is') + ' never covered)';
    return text;
  }

  function buildConv() {
    var sh = shape(), p = S.padding, ex = S.ex;
    $('example-note').textContent = ex.note;
    var size = $('conv-size');
    size.textContent = 'Output: ' + dims(sh.Ho, sh.Wo, sh.K) + ' (height \u00d7 width \u00d7 maps).  ' +
      sizeText(sh.W, p, S.stride, sh.Wo, 'W') + (sh.H === sh.W ? '; the same down the rows.' :
      '; ' + sizeText(sh.H, p, S.stride, sh.Ho, 'H') + '.');
    size.dataset.ho = sh.Ho; size.dataset.wo = sh.Wo; size.dataset.depth = sh.K;
    $('input-dims').textContent = dims(sh.H, sh.W, sh.C) + (p ? ', zero padding ' + p + ' (hatched)' : ', no padding');
    $('filter-dims').textContent = sh.K + ' of ' + dims(F, F, sh.C);
    $('output-dims').textContent = dims(sh.Ho, sh.Wo, sh.K);

    var pictures = $('pictures');
    pictures.hidden = !ex.images.preview;
    if (ex.images.preview) {
      $('picture-preview').src = ex.images.preview;
      $('picture-preview').alt = 'The input image, ' + ex.name;
      $('picture-pixels').src = ex.images.pixels;
      $('picture-pixels').alt = 'The same image at ' + sh.H + ' by ' + sh.W + ' pixels, as the grids show it';
    }

    var top = 0;
    ex.x.forEach(function (plane) { plane.forEach(function (row) { row.forEach(function (v) { top = Math.max(top, v); }); }); });
    var box = $('input-grids');
    box.replaceChildren();
    S.inputCells = ex.x.map(function (plane, c) {
      var g = grid(sh.H + 2 * p, sh.W + 2 * p, ex.channels[c] + ' channel, x[:, :, ' + c + ']', function (td, r, col) {
        var v = padded(c, r, col);
        td.textContent = num(v);
        var inside = r >= p && r < sh.H + p && col >= p && col < sh.W + p;
        if (inside) td.style.background = greyFor(v, top); else td.className = 'pad';
      });
      g.table.setAttribute('aria-label', 'input, ' + ex.channels[c] + ' channel, with zero padding ' + p);
      box.appendChild(g.table);
      return g.cells;
    });

    box = $('filter-grids');
    box.replaceChildren();
    var wMax = maxAbs(ex.weight);
    S.filterBoxes = ex.weight.map(function (w, k) {
      var f = el('div', 'filter');
      var scale = ex.scales[k] > 1 ? ' (the slides\u2019 filter \u00d7 ' + ex.scales[k] + ')' : '';
      f.appendChild(el('div', 'name', 'Filter ' + k + ': ' + ex.filters[k] + scale));
      w.forEach(function (plane, c) {
        f.appendChild(grid(F, F, 'w' + k + ', ' + ex.channels[c], function (td, u, v) {
          td.textContent = num(plane[u][v]);
          td.style.background = signedFor(plane[u][v], wMax);
        }, true).table);
      });
      f.appendChild(grid(1, 1, 'bias b' + k, function (td) { td.textContent = num(ex.bias[k]); }, true).table);
      box.appendChild(f);
      return f;
    });

    box = $('output-grids');
    box.replaceChildren();
    S.outputCells = S.res.out.map(function (map, k) {
      var m = maxAbs(map);
      var g = grid(sh.Ho, sh.Wo, 'map ' + k + ' (filter ' + k + ')', function (td, i, j) {
        td.id = 'o-' + k + '-' + i + '-' + j;
        td.dataset.value = map[i][j];
        td.dataset.colour = signedFor(map[i][j], m);
      });
      g.table.setAttribute('aria-label', 'output map ' + k);
      box.appendChild(g.table);
      return g.cells;
    });

    box = $('products');
    box.replaceChildren();
    S.productTables = ex.x.map(function (plane, c) {
      var row = el('div', 'product-row');
      var tables = {
        win: grid(F, F, 'window, ' + ex.channels[c], function () {}, true),
        w: grid(F, F, 'filter weights', function () {}, true),
        prod: grid(F, F, 'products', function () {}, true)
      };
      row.appendChild(tables.win.table);
      row.appendChild(el('span', 'op', '\u00d7'));
      row.appendChild(tables.w.table);
      row.appendChild(el('span', 'op', '='));
      row.appendChild(tables.prod.table);
      tables.sum = el('span', 'channel-sum');
      row.appendChild(tables.sum);
      box.appendChild(row);
      return tables;
    });
    $('conv-count').textContent = String(sh.C * F * F);

    var range = $('conv-position');
    range.max = String(sh.K * sh.Ho * sh.Wo - 1);
    S.step = 0;
    showConv();
    buildPool();
  }

  function showConv() {
    var sh = shape(), ex = S.ex, s = S.stride;
    var per = sh.Ho * sh.Wo;
    var k = Math.floor(S.step / per), i = Math.floor((S.step % per) / sh.Wo), j = S.step % sh.Wo;
    var r0 = i * s, c0 = j * s;

    S.inputCells.forEach(function (cells) {
      cells.forEach(function (line, r) {
        line.forEach(function (td, col) {
          td.classList.toggle('win', r >= r0 && r < r0 + F && col >= c0 && col < c0 + F);
        });
      });
    });
    S.filterBoxes.forEach(function (f, q) { f.classList.toggle('active', q === k); });

    var wMax = maxAbs(ex.weight), terms = [], total = 0;
    S.productTables.forEach(function (t, c) {
      var sum = 0, prods = [];
      for (var u = 0; u < F; u++) {
        for (var v = 0; v < F; v++) {
          var xv = padded(c, r0 + u, c0 + v), wv = ex.weight[k][c][u][v];
          prods.push(xv * wv);
          t.win.cells[u][v].textContent = num(xv);
          t.w.cells[u][v].textContent = num(wv);
          t.w.cells[u][v].style.background = signedFor(wv, wMax);
          t.prod.cells[u][v].textContent = num(xv * wv);
          t.prod.cells[u][v].style.background = signedFor(xv * wv, 9 * wMax);
          sum += xv * wv;
        }
      }
      t.sum.textContent = 'sum ' + num(sum);
      terms.push(paren(sum));
      total += sum;
    });

    var value = S.res.out[k][i][j], bias = ex.bias[k];
    if (total + bias !== value) {  // the products shown here must add up to Python's number
      S.mismatches += 1;
      document.documentElement.setAttribute('data-mismatches', String(S.mismatches));
      console.error('products + bias = ' + (total + bias) + ' but Python computed ' + value + ' at ' + [k, i, j]);
    }
    var where = 'o[' + i + ', ' + j + ', ' + k + ']';
    $('compute-title').textContent = 'Step ' + (S.step + 1) + ' of ' + sh.K * per + ': ' + where +
      ' (row ' + i + ', column ' + j + ' of map ' + k + ')';
    $('conv-terms').textContent = terms.join(' + ') + (terms.length > 1 ? ' (one sum per channel)' : '');
    $('conv-sum').textContent = num(total);
    $('conv-sum-again').textContent = paren(total);
    $('conv-bias').textContent = paren(bias);
    $('conv-value').textContent = num(value);
    var current = $('conv-current');
    current.textContent = where;
    current.dataset.k = k; current.dataset.i = i; current.dataset.j = j;

    S.outputCells.forEach(function (cells, q) {
      cells.forEach(function (line, a) {
        line.forEach(function (td, b) {
          var done = q * per + a * sh.Wo + b <= S.step;
          td.textContent = done ? td.dataset.value : '';
          td.style.background = done ? td.dataset.colour : '#fff';
          td.classList.toggle('current', q === k && a === i && b === j);
        });
      });
    });
    var range = $('conv-position');
    range.value = String(S.step);
    range.setAttribute('aria-valuetext', 'step ' + (S.step + 1) + ' of ' + (sh.K * per) + ', ' + where);
  }

  // ---------------------------------------------------------------------------------------------- pooling

  function buildPool() {
    var sh = shape(), pool = S.res.pool;
    var select = $('pool-map');
    if (select.options.length !== sh.K) {
      select.replaceChildren();
      for (var k = 0; k < sh.K; k++) {
        var o = el('option', '', 'map ' + k + ' (' + S.ex.filters[k] + ')');
        o.value = String(k);
        select.appendChild(o);
      }
    }
    S.poolMap = Math.min(S.poolMap, sh.K - 1);
    select.value = String(S.poolMap);
    var ok = pool !== null;
    $('pool-empty').hidden = ok;
    $('pool-panels').hidden = !ok;
    ['pool-reset', 'pool-back', 'pool-play', 'pool-step', 'pool-position', 'pool-map'].forEach(function (id) {
      $(id).disabled = !ok;
    });
    var size = $('pool-size');
    if (!ok) {
      stop('pool');
      $('pool-empty').textContent = 'The output maps are ' + sh.Ho + ' \u00d7 ' + sh.Wo + ': smaller than one ' +
        POOL + ' \u00d7 ' + POOL + ' window, so there is nothing to pool. Choose a smaller stride or more padding.';
      size.textContent = '';
      size.dataset.ho = 0; size.dataset.wo = 0;
      return;
    }
    var k0 = S.poolMap, relu = S.res.relu[k0], values = pool.values[k0];
    var Hp = values.length, Wp = values[0].length;
    size.textContent = 'ReLU map ' + dims(sh.Ho, sh.Wo, sh.K) + ' \u2192 pooled ' + dims(Hp, Wp, sh.K) +
      ' (\u230a' + sh.Ho + ' / 2\u230b = ' + Hp + ' rows, \u230a' + sh.Wo + ' / 2\u230b = ' + Wp + ' columns; depth unchanged)';
    size.dataset.ho = Hp; size.dataset.wo = Wp; size.dataset.depth = sh.K;
    $('pool-in-dims').textContent = sh.Ho + ' \u00d7 ' + sh.Wo + ', map ' + k0;
    $('pool-out-dims').textContent = Hp + ' \u00d7 ' + Wp;
    var top = maxAbs(relu);
    var g = grid(sh.Ho, sh.Wo, 'ReLU(map ' + k0 + ')', function (td, r, c) {
      td.textContent = num(relu[r][c]);
      if (r >= POOL * Hp || c >= POOL * Wp) td.className = 'dropped';
      else td.style.background = signedFor(relu[r][c], top);
    });
    $('pool-input').replaceChildren(g.table);
    S.poolIn = g.cells;
    g = grid(Hp, Wp, 'max-pooled map ' + k0, function (td, a, b) {
      td.id = 'p-' + a + '-' + b;
      td.dataset.value = values[a][b];
      td.dataset.colour = signedFor(values[a][b], top);
    });
    $('pool-output').replaceChildren(g.table);
    S.poolOut = g.cells;
    $('pool-position').max = String(Hp * Wp - 1);
    S.poolStep = Math.min(S.poolStep, Hp * Wp - 1);
    showPool();
  }

  function showPool() {
    var pool = S.res.pool;
    if (pool === null) return;
    var sh = shape(), k = S.poolMap, values = pool.values[k], indices = pool.indices[k], relu = S.res.relu[k];
    var Wp = values[0].length, total = values.length * Wp;
    var a = Math.floor(S.poolStep / Wp), b = S.poolStep % Wp;
    var best = indices[a][b], br = Math.floor(best / sh.Wo), bc = best % sh.Wo;
    var windowValues = [];
    S.poolIn.forEach(function (line, r) {
      line.forEach(function (td, c) {
        var inside = r >= POOL * a && r < POOL * a + POOL && c >= POOL * b && c < POOL * b + POOL;
        td.classList.toggle('pwin', inside && !(r === br && c === bc));
        td.classList.toggle('pmax', r === br && c === bc);
        if (inside) windowValues.push(relu[r][c]);
      });
    });
    S.poolOut.forEach(function (line, i) {
      line.forEach(function (td, j) {
        var done = i * Wp + j <= S.poolStep;
        td.textContent = done ? td.dataset.value : '';
        td.style.background = done ? td.dataset.colour : '#fff';
        td.classList.toggle('current', i === a && j === b);
      });
    });
    var current = $('pool-current');
    current.textContent = 'pooled[' + a + ', ' + b + ']';
    current.dataset.k = k; current.dataset.i = a; current.dataset.j = b;
    $('pool-window').textContent = windowValues.join(', ');
    $('pool-value').textContent = num(values[a][b]);
    var range = $('pool-position');
    range.value = String(S.poolStep);
    range.setAttribute('aria-valuetext', 'step ' + (S.poolStep + 1) + ' of ' + total);
  }

  // ---------------------------------------------------------------------------------------------- controls

  function steps(which) {
    if (which === 'conv') { var sh = shape(); return sh.K * sh.Ho * sh.Wo; }
    var pool = S.res.pool;
    return pool === null ? 1 : pool.values[S.poolMap].length * pool.values[S.poolMap][0].length;
  }
  function go(which, to) {
    var n = steps(which);
    to = ((to % n) + n) % n;  // past the end starts again, as the demo loops
    if (which === 'conv') { S.step = to; showConv(); } else { S.poolStep = to; showPool(); }
  }
  function stop(which) {
    var key = which === 'conv' ? 'timer' : 'poolTimer';
    if (S[key]) { clearInterval(S[key]); S[key] = null; }
    var button = $(which + '-play');
    button.setAttribute('aria-pressed', 'false');
    button.textContent = '\u25b6 Play';
  }
  function togglePlay(which) {
    var key = which === 'conv' ? 'timer' : 'poolTimer', stepKey = which === 'conv' ? 'step' : 'poolStep';
    if (S[key]) { stop(which); return; }
    S[key] = setInterval(function () { go(which, S[stepKey] + 1); }, PLAY_MS);
    var button = $(which + '-play');
    button.setAttribute('aria-pressed', 'true');
    button.textContent = 'Pause';
  }
  function wire(which) {
    var stepKey = which === 'conv' ? 'step' : 'poolStep';
    $(which + '-step').addEventListener('click', function () { go(which, S[stepKey] + 1); });
    $(which + '-back').addEventListener('click', function () { go(which, S[stepKey] - 1); });
    $(which + '-reset').addEventListener('click', function () { stop(which); go(which, 0); });
    $(which + '-play').addEventListener('click', function () { togglePlay(which); });
    $(which + '-position').addEventListener('input', function (e) { go(which, Number(e.target.value)); });
  }

  function choose() {
    S.ex = DATA.examples[Number($('example').value)];
    S.stride = Number($('stride').value);
    S.padding = Number($('padding').value);
    S.res = S.ex.results['s' + S.stride + 'p' + S.padding];
    buildConv();
  }

  $('example').addEventListener('change', function () {
    var ex = DATA.examples[Number($('example').value)];
    $('stride').value = String(ex.default.stride);
    $('padding').value = String(ex.default.padding);
    choose();
  });
  $('stride').addEventListener('change', choose);
  $('padding').addEventListener('change', choose);
  $('pool-map').addEventListener('change', function () {
    S.poolMap = Number($('pool-map').value);
    S.poolStep = 0;
    buildPool();
  });
  ['conv-controls', 'pool-controls'].forEach(function (id) {
    $(id).addEventListener('submit', function (e) { e.preventDefault(); });
  });
  wire('conv');
  wire('pool');

  var first = DATA.examples[0];
  $('stride').value = String(first.default.stride);
  $('padding').value = String(first.default.padding);
  choose();
  document.documentElement.setAttribute('data-ready', 'true');
})();
