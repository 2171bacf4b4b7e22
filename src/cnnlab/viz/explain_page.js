// The explain page: draws every layer's maps from the embedded float32 values (computed by PyTorch) and, for a
// chosen pixel, redoes the layer's arithmetic from its real input; any result that differs from the stored output
// is counted in <html data-mismatches>. With <body data-live="true"> (cnnlab serve) images can be sent to the
// server, whose forward pass returns one more image in the same form.
(function () {
  'use strict';
  var DATA = JSON.parse(document.getElementById('cnnlab-data').textContent);
  var LIVE = document.body.getAttribute('data-live') === 'true';
  var $ = function (id) { return document.getElementById(id); };
  var LAYERS = {};
  DATA.layers.forEach(function (l) { LAYERS[l.id] = l; });
  var S = { img: 0, layer: null, c: 0, i: 0, j: 0, mismatches: 0, cache: [] };
  var SHOW = 8;  // input channels drawn as grids in a convolution's detail; the others are summed in one line

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) {
    if (!isFinite(v)) return String(v);
    var a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toFixed(4);
  }
  function decode(b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var k = 0; k < bin.length; k++) bytes[k] = bin.charCodeAt(k);
    return new Float32Array(bytes.buffer);
  }

  // -------------------------------------------------------------------------------------- values and shapes

  function image() { return DATA.images[S.img]; }
  function key(id) { var l = LAYERS[id]; return l && l.same_as ? l.same_as : id; }
  function values(id) {
    var cache = S.cache[S.img] || (S.cache[S.img] = {});
    var k = key(id);
    if (!cache[k]) cache[k] = decode(image().acts[k]);
    return cache[k];
  }
  // {C: maps held, total: maps of the layer, H, W} of a layer's output, the input, or a layer's own input copy
  function shapeOf(id) {
    var s;
    if (id === 'input') s = DATA.input_shape;
    else if (/\/in$/.test(id)) s = LAYERS[id.slice(0, -3)].in_shape;
    else s = LAYERS[id].shape;
    if (s.length === 1) return { C: s[0], total: s[0], H: 1, W: 1, flat: true };
    var held = id === 'input' ? s[0] : values(id).length / (s[1] * s[2]);
    return { C: held, total: s[0], H: s[1], W: s[2] };
  }
  function at(v, sh, c, i, j) { return v[(c * sh.H + i) * sh.W + j]; }

  // ------------------------------------------------------------------------------------------------- colour

  function colour(t) {  // t in [-1, 1]: blue through white to vermillion
    var a = Math.min(1, Math.abs(t));
    var to = t < 0 ? [33, 102, 172] : [213, 94, 0];
    return [255 + (to[0] - 255) * a, 255 + (to[1] - 255) * a, 255 + (to[2] - 255) * a];
  }
  function scaleOf(v) {
    var m = 0;
    for (var k = 0; k < v.length; k++) { var a = Math.abs(v[k]); if (a > m) m = a; }
    return m;
  }
  function paint(canvas, v, offset, H, W, scale) {
    canvas.width = W; canvas.height = H;
    var ctx = canvas.getContext('2d'), im = ctx.createImageData(W, H);
    for (var p = 0; p < H * W; p++) {
      var rgb = colour(scale > 0 ? v[offset + p] / scale : 0);
      im.data[4 * p] = rgb[0]; im.data[4 * p + 1] = rgb[1]; im.data[4 * p + 2] = rgb[2]; im.data[4 * p + 3] = 255;
    }
    ctx.putImageData(im, 0, 0);
  }

  // --------------------------------------------------------------------------------------------- columns

  function column(id, title, sub, container) {
    var col = el('div', 'col'), sh = shapeOf(id), v = values(id), scale = scaleOf(v);
    col.dataset.layer = id;
    col.appendChild(el('h3', '', title));
    if (sub) col.appendChild(el('div', 'sub', sub));
    col.appendChild(el('div', 'sub', sh.flat ? sh.total + ' units' : sh.H + '\u00d7' + sh.W + '\u00d7' + sh.total));
    var sc = el('div', 'sub scale', '\u00b1' + fmt(scale));
    sc.title = 'colour scale of this column: from \u2212' + fmt(scale) + ' (blue) to +' + fmt(scale) + ' (vermillion)';
    col.appendChild(sc);
    if (sh.flat) {
      var cv = el('canvas', 'units');
      var n = v.length;
      paint(cv, v, 0, n, 1, scale);
      cv.style.height = Math.min(400, Math.max(40, 3 * n)) + 'px';
      cv.id = 'map-' + id + '-0';
      cv.dataset.layer = id; cv.dataset.c = 0;
      cv.tabIndex = 0;
      cv.setAttribute('aria-label', id + ': ' + n + ' units; click for one unit');
      cv.addEventListener('click', function (e) {
        var r = cv.getBoundingClientRect();
        var u = Math.min(n - 1, Math.max(0, Math.floor((e.clientY - r.top) / r.height * n)));
        openDetail(id, 0, u, 0);
      });
      cv.addEventListener('keydown', function (e) { if (e.key === 'Enter') openDetail(id, 0, 0, 0); });
      col.appendChild(cv);
      if (LAYERS[id] && LAYERS[id].shown < LAYERS[id].shape[0]) {
        col.appendChild(el('div', 'more', 'first ' + LAYERS[id].shown + ' of ' + LAYERS[id].shape[0] + ' units'));
      }
    } else {
      for (var c = 0; c < sh.C; c++) {
        var m = el('canvas', 'map');
        paint(m, v, c * sh.H * sh.W, sh.H, sh.W, scale);
        m.id = 'map-' + id + '-' + c;
        m.dataset.layer = id; m.dataset.c = c;
        m.tabIndex = 0;
        m.setAttribute('aria-label', id + ', map ' + c);
        m.title = id + ', map ' + c;
        (function (m, c) {
          m.addEventListener('click', function () { openDetail(id, c, null, null); });
          m.addEventListener('keydown', function (e) { if (e.key === 'Enter') openDetail(id, c, null, null); });
          m.addEventListener('mouseenter', function () { link(m, container); });
          m.addEventListener('mouseleave', function () { unlink(container); });
          m.addEventListener('focus', function () { link(m, container); });
          m.addEventListener('blur', function () { unlink(container); });
        })(m, c);
        col.appendChild(m);
      }
      if (sh.C < sh.total) col.appendChild(el('div', 'more', 'first ' + sh.C + ' of ' + sh.total + ' maps (page size)'));
    }
    return col;
  }

  function layerTitle(l) { return l.id.replace(/#\d+$/, ''); }

  function renderOverview() {
    var box = $('overview');
    box.replaceChildren();
    box.appendChild(column('input', 'input', 'normalised'));
    var img = el('img');
    img.src = image().preview; img.alt = 'input image'; img.className = 'map';
    img.style.width = '48px'; img.style.imageRendering = 'pixelated';
    box.firstChild.insertBefore(img, box.firstChild.children[4]);
    DATA.columns.forEach(function (id) {
      var l = LAYERS[id], col = column(id, layerTitle(l), l.label, box);
      if (l.kind === 'block') {
        col.classList.add('block');
        var b = el('button', 'block-open', 'open block');
        b.id = 'open-' + id;
        b.addEventListener('click', function () { openBlock(id); });
        col.insertBefore(b, col.children[1]);
      }
      box.appendChild(col);
    });
    var out = el('div', 'col');
    out.appendChild(el('h3', '', 'softmax'));
    var probs = image().probs, order = probs.map(function (p, k) { return k; });
    order.sort(function (a, b) { return probs[b] - probs[a]; });
    order.slice(0, 5).forEach(function (k) {
      out.appendChild(el('div', 'sub', DATA.classes[k] + ' ' + (100 * probs[k]).toFixed(1) + '%'));
    });
    box.appendChild(out);
    sizeSvg($('links'), $('overview'));
  }

  function sizeSvg(svg, box) {
    svg.setAttribute('width', box.scrollWidth);
    svg.setAttribute('height', box.scrollHeight);
  }

  // the maps a unit's map was computed from: all held input maps for a convolution (within its group) or a
  // dense layer, the same map for pooling, batch norm and activations
  function inputsOf(id, c) {
    var l = LAYERS[id];
    if (!l || !l.src) return [];
    var src = l.src, sh = shapeOf(src);
    if (l.kind === 'conv') {
      var per = sh.total / l.groups, g = Math.floor(c / (l.shape[0] / l.groups)), out = [];
      for (var k = g * per; k < Math.min(sh.C, (g + 1) * per); k++) out.push([src, k]);
      return out;
    }
    if (l.kind === 'block') { var all = []; for (var q = 0; q < sh.C; q++) all.push([src, q]); return all; }
    if (sh.flat || l.kind === 'linear') return [[src, 0]];
    return c < sh.C ? [[src, c]] : [];
  }

  function link(m, container) {
    var box = container || $('overview'), svg = box === $('overview') ? $('links') : $('skip-links');
    if (!svg) return;
    unlink(box);
    var wrap = box.parentNode, w = wrap.getBoundingClientRect();
    var to = m.getBoundingClientRect();
    inputsOf(m.dataset.layer, +m.dataset.c).forEach(function (pair) {
      var src = box.querySelector('[id="map-' + pair[0] + '-' + pair[1] + '"]');
      if (!src) return;
      src.classList.add('linked');
      var from = src.getBoundingClientRect();
      var line = document.createElementNS('http://www.w3.org/2000/svg', 'line');
      line.setAttribute('x1', from.right - w.left + wrap.scrollLeft); line.setAttribute('y1', (from.top + from.bottom) / 2 - w.top);
      line.setAttribute('x2', to.left - w.left + wrap.scrollLeft); line.setAttribute('y2', (to.top + to.bottom) / 2 - w.top);
      line.setAttribute('stroke', '#0072B2'); line.setAttribute('stroke-width', '1'); line.setAttribute('opacity', '0.6');
      svg.appendChild(line);
    });
    document.documentElement.setAttribute('data-links', String(svg.childNodes.length));
  }
  function unlink(box) {
    (box || document).querySelectorAll('.linked').forEach(function (e) { e.classList.remove('linked'); });
    [$('links'), $('skip-links')].forEach(function (svg) { if (svg) svg.replaceChildren(); });
  }

  // ------------------------------------------------------------------------------------------ residual blocks

  function openBlock(id) {
    var l = LAYERS[id], box = $('block');
    $('block-section').hidden = false;
    $('block-name').textContent = id;
    box.replaceChildren();
    var skip = $('skip');
    skip.replaceChildren();
    var g = document.createElementNS('http://www.w3.org/2000/svg', 'g');
    g.id = 'skip-links';
    box.appendChild(column(l.src, 'block input', l.src, box));
    l.children.forEach(function (cid) {
      var c = LAYERS[cid];
      if (cid === l.sum_of) {
        var sum = column(cid + '/in', '+', 'main path + shortcut', box);
        sum.classList.add('sum');
        box.appendChild(sum);
      }
      var col = column(cid, layerTitle(c).slice(id.length + 1), c.label, box);
      if (cid.indexOf(id + '.downsample') === 0) col.querySelector('h3').textContent += ' (shortcut)';
      box.appendChild(col);
    });
    $('block-note').textContent = l.residual === false ? 'A plain block: no shortcut.' :
      'The shortcut (' + (l.shortcut === 'identity' ? 'identity: the block input itself' : l.shortcut) +
      ') is added to the main path at \u201c+\u201d; then the last activation.';
    sizeSvg(skip, box);
    skip.appendChild(g);
    if (l.residual !== false && l.sum_of) drawSkip(box, l);
    $('block-section').scrollIntoView({ block: 'nearest' });
  }

  function drawSkip(box, l) {
    var wrap = box.parentNode, w = wrap.getBoundingClientRect();
    var from = box.querySelector('[data-layer="' + l.src + '"]').getBoundingClientRect();
    var to = box.querySelector('[data-layer="' + l.sum_of + '/in"]').getBoundingClientRect();
    var x1 = (from.left + from.right) / 2 - w.left + wrap.scrollLeft, x2 = (to.left + to.right) / 2 - w.left + wrap.scrollLeft;
    var y = 6;
    var path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
    path.setAttribute('d', 'M' + x1 + ',' + (from.top - w.top) + ' L' + x1 + ',' + y + ' L' + x2 + ',' + y + ' L' + x2 + ',' + (to.top - w.top));
    path.setAttribute('fill', 'none'); path.setAttribute('stroke', '#D55E00'); path.setAttribute('stroke-width', '2.5');
    path.id = 'skip-path';
    $('skip').appendChild(path);
    box.style.paddingTop = '14px';
  }

  // ---------------------------------------------------------------------------------------------- details

  function openDetail(id, c, i, j) {
    var sh = shapeOf(id);
    if (i === null) {  // the map's largest value: a pixel where something happens
      var v = values(id), best = -Infinity;
      i = 0; j = 0;
      for (var a = 0; a < sh.H; a++) for (var b = 0; b < sh.W; b++) {
        var x = at(v, sh, c, a, b);
        if (x > best) { best = x; i = a; j = b; }
      }
    }
    S.layer = id; S.c = c; S.i = i; S.j = j;
    document.querySelectorAll('canvas.chosen').forEach(function (e) { e.classList.remove('chosen'); });
    var m = $('map-' + id + '-' + c);
    if (m) m.classList.add('chosen');
    $('detail-section').hidden = false;
    $('pixel-row').max = sh.H - 1; $('pixel-col').max = sh.W - 1;
    $('pixel-row').value = i; $('pixel-col').value = j;
    $('pixel-form').hidden = !!sh.flat;
    showDetail();
  }

  function showDetail() {
    var id = S.layer, l = LAYERS[id], sh = shapeOf(id), v = values(id);
    var c = S.c, i = S.i, j = S.j;
    var flat = sh.flat, unit = flat ? i : null;
    var sec = $('detail-section');
    sec.dataset.layer = id; sec.dataset.c = c; sec.dataset.i = i; sec.dataset.j = j;
    $('detail-title').textContent = (l ? layerTitle(l) + ' (' + l.label + ')' : id) +
      (flat ? ', unit ' + unit : ', map ' + c + ', row ' + i + ', column ' + j);
    var canvas = $('detail-map');
    if (flat) paint(canvas, v, 0, v.length, 1, scaleOf(v));
    else paint(canvas, v, c * sh.H * sh.W, sh.H, sh.W, scaleOf(v));
    canvas.style.height = flat ? '256px' : (256 * sh.H / sh.W) + 'px';
    canvas.style.width = flat ? '24px' : '256px';
    var body = $('detail-body');
    body.replaceChildren();
    var stored = flat ? v[unit] : at(v, sh, c, i, j);
    var kind = l ? l.kind : 'input';
    body.dataset.kind = kind;
    if (kind === 'conv') convDetail(body, l, c, i, j, stored);
    else if (kind === 'pool') poolDetail(body, l, c, i, j, stored);
    else if (kind === 'act' || kind === 'bn') pointDetail(body, l, c, i, j, stored);
    else if (kind === 'linear') linearDetail(body, l, unit, stored);
    else if (kind === 'block') blockDetail(body, l, c, i, j, stored);
    else body.appendChild(el('p', '', (l ? 'A ' + l.label + ' layer: its arithmetic is not redone here. ' : '') +
                                       'Value: ' + fmt(stored)));
    var out = el('p', 'eq');
    out.appendChild(document.createTextNode('stored output of the layer (PyTorch): '));
    var st = el('b', '', fmt(stored));
    st.id = 'detail-stored'; st.dataset.value = stored;
    out.appendChild(st);
    body.appendChild(out);
  }

  function check(computed, stored, magnitude) {
    var ok = Math.abs(computed - stored) <= 1e-4 * Math.max(1, magnitude);
    if (!ok) {
      S.mismatches++;
      document.documentElement.setAttribute('data-mismatches', String(S.mismatches));
      console.warn('explain page: computed ' + computed + ' but the layer gave ' + stored);
    }
    return ok;
  }

  function result(text, value, id) {
    var p = el('p', 'eq', text + ' ');
    var b = el('b', 'result', fmt(value));
    b.id = id; b.dataset.value = value;
    p.appendChild(b);
    return p;
  }

  function table(rows, cols, caption, fill) {
    var t = el('table', 'grid');
    t.appendChild(el('caption', '', caption));
    for (var r = 0; r < rows; r++) {
      var tr = t.insertRow();
      for (var q = 0; q < cols; q++) fill(tr.insertCell(), r, q);
    }
    return t;
  }

  function convDetail(body, l, c, i, j, stored) {
    var src = l.src, sh = shapeOf(src), xv = values(src), w = decode(l.weight);
    var kh = l.kernel[0], kw = l.kernel[1], per = sh.total / l.groups;
    var g = Math.floor(c / (l.shape[0] / l.groups)), first = g * per, last = Math.min(sh.C, (g + 1) * per);
    var total = 0, magnitude = 0, lines = 0, hidden = 0, hiddenSum = 0;
    body.appendChild(el('p', 'note', 'Output (' + i + ', ' + j + ') of map ' + c + ': the ' + kh + '\u00d7' + kw +
      ' window at input row ' + (i * l.stride[0] - l.padding[0]) + ', column ' + (j * l.stride[1] - l.padding[1]) +
      ' (stride ' + l.stride[0] + ', padding ' + l.padding[0] + ') on each input map, times the kernel, summed.'));
    var box = el('div', 'channels');
    for (var ci = first; ci < last; ci++) {
      var sum = 0, win = [], ker = [], prod = [];
      for (var u = 0; u < kh; u++) {
        win.push([]); ker.push([]); prod.push([]);
        for (var q = 0; q < kw; q++) {
          var r = i * l.stride[0] - l.padding[0] + u * l.dilation[0], s = j * l.stride[1] - l.padding[1] + q * l.dilation[1];
          var inside = r >= 0 && r < sh.H && s >= 0 && s < sh.W;
          var xval = inside ? at(xv, sh, ci, r, s) : 0;
          var wval = w[((c * per + (ci - first)) * kh + u) * kw + q];
          win[u].push([xval, inside]); ker[u].push(wval); prod[u].push(xval * wval);
          sum += xval * wval; magnitude += Math.abs(xval * wval);
        }
      }
      total += sum;
      if (lines < SHOW) {
        var d = el('div', 'channel');
        d.appendChild(table(kh, kw, 'input map ' + ci + ' window', function (td, a, b) {
          td.textContent = fmt(win[a][b][0]); if (!win[a][b][1]) td.className = 'pad';
        }));
        d.appendChild(table(kh, kw, 'kernel [' + c + ', ' + (ci - first) + ']', function (td, a, b) { td.textContent = fmt(ker[a][b]); }));
        d.appendChild(table(kh, kw, 'products', function (td, a, b) { td.textContent = fmt(prod[a][b]); }));
        var cs = el('span', 'eq', 'sum: ' + fmt(sum));
        cs.id = 'channel-sum-' + ci; cs.dataset.value = sum;
        d.appendChild(cs);
        box.appendChild(d);
        lines++;
      } else { hidden++; hiddenSum += sum; }
    }
    body.appendChild(box);
    if (hidden) body.appendChild(el('p', 'eq', 'input maps ' + (first + SHOW) + '\u2013' + (last - 1) +
                                     ' (not drawn), their products summed: ' + fmt(hiddenSum)));
    var rest = 0;
    if (l.held < sh.total && image().acts[l.id + '/rest']) {
      var rv = decode(image().acts[l.id + '/rest']), osh = shapeOf(l.id);
      rest = at(rv, osh, c, i, j);
      body.appendChild(el('p', 'eq', 'input maps ' + l.held + '\u2013' + (sh.total - 1) + ' (not on this page; ' +
                                     'computed by PyTorch): ' + fmt(rest)));
      magnitude += Math.abs(rest);
    }
    var sumP = result('sum of products:', total + rest, 'detail-sum');
    body.appendChild(sumP);
    var bias = l.bias[c];
    var bp = result('bias:', bias, 'detail-bias');
    body.appendChild(bp);
    var value = total + rest + bias;
    body.appendChild(result('sum + bias =', value, 'detail-value'));
    check(value, stored, magnitude);
  }

  function poolDetail(body, l, c, i, j, stored) {
    var src = l.src, sh = shapeOf(src), xv = values(src);
    var kh = l.kernel[0], kw = l.kernel[1], best = -Infinity, sum = 0, n = 0, bu = 0, bq = 0, win = [];
    for (var u = 0; u < kh; u++) {
      win.push([]);
      for (var q = 0; q < kw; q++) {
        var r = i * l.stride[0] - l.padding[0] + u, s = j * l.stride[1] - l.padding[1] + q;
        var inside = r >= 0 && r < sh.H && s >= 0 && s < sh.W;
        var x = inside ? at(xv, sh, c, r, s) : (l.op === 'max' ? -Infinity : 0);
        win[u].push([x, inside]);
        if (x > best) { best = x; bu = u; bq = q; }
        sum += x; n++;
      }
    }
    body.appendChild(table(kh, kw, 'window on map ' + c + ' of ' + src, function (td, a, b) {
      td.textContent = win[a][b][1] ? fmt(win[a][b][0]) : 'pad';
      if (!win[a][b][1]) td.className = 'pad';
      if (l.op === 'max' && a === bu && b === bq) td.className = 'max';
    }));
    var value = l.op === 'max' ? best : sum / n;
    body.appendChild(result(l.op === 'max' ? 'maximum of the window =' : 'mean of the window =', value, 'detail-value'));
    check(value, stored, Math.abs(value));
  }

  function pointDetail(body, l, c, i, j, stored) {
    var src = l.src, sh = shapeOf(src), xv = values(src);
    var x = sh.flat ? xv[i] : at(xv, sh, c, i, j), value;
    var before = result('before (' + (src === 'input' ? 'input' : src.replace(/\/in$/, ' input')) + '):', x, 'detail-before');
    body.appendChild(before);
    if (l.kind === 'bn') {
      value = (x - l.mean[c]) / Math.sqrt(l.var[c] + l.eps) * l.gamma[c] + l.beta[c];
      body.appendChild(el('p', 'eq', '(x \u2212 mean) / \u221a(var + eps) \u00b7 \u03b3 + \u03b2 = (' + fmt(x) + ' \u2212 ' +
        fmt(l.mean[c]) + ') / \u221a(' + fmt(l.var[c]) + ' + ' + l.eps + ') \u00b7 ' + fmt(l.gamma[c]) + ' + ' + fmt(l.beta[c])));
    } else if (l.label === 'ReLU') {
      value = Math.max(0, x);
      body.appendChild(el('p', 'eq', 'ReLU: max(0, ' + fmt(x) + ')'));
    } else {
      value = stored;
      body.appendChild(el('p', 'note', l.label + ' of the value before'));
    }
    body.appendChild(result('after =', value, 'detail-value'));
    check(value, stored, Math.abs(x));
  }

  function linearDetail(body, l, u, stored) {
    var top = image().acts[l.id + '/top'], idx = top.index[u], xs = top.x[u], ws = top.w[u];
    var total = top.rest[u], magnitude = Math.abs(top.rest[u]);
    body.appendChild(el('p', 'note', 'Unit ' + u + ' of ' + l.label + ': every input times its weight, summed, plus ' +
                                      'the bias. The ' + idx.length + ' largest products (by size) are listed.'));
    body.appendChild(table(idx.length + 1, 4, 'largest products', function (td, r, q) {
      if (r === 0) { td.textContent = ['input', 'x', 'weight', 'x \u00b7 w'][q]; return; }
      var k = r - 1;
      td.textContent = [String(idx[k]), fmt(xs[k]), fmt(ws[k]), fmt(xs[k] * ws[k])][q];
    }));
    for (var k = 0; k < idx.length; k++) { total += xs[k] * ws[k]; magnitude += Math.abs(xs[k] * ws[k]); }
    body.appendChild(el('p', 'eq', 'all other products (computed by PyTorch): ' + fmt(top.rest[u])));
    body.appendChild(result('sum of products:', total, 'detail-sum'));
    body.appendChild(result('bias:', l.bias[u], 'detail-bias'));
    var value = total + l.bias[u];
    body.appendChild(result('sum + bias =', value, 'detail-value'));
    check(value, stored, magnitude);
    if (l.id === lastLinear()) {
      var probs = image().probs, logits = image().logits;
      body.appendChild(el('p', 'note', 'These are the logits' + (sameAsLogits() ? '' : ' (the model scales them before ' +
        'the softmax)') + '. Softmax: p_k = exp(z_k) / \u03a3 exp(z_j).'));
      body.appendChild(table(probs.length + 1, 3, 'logits and softmax', function (td, r, q) {
        if (r === 0) { td.textContent = ['class', 'logit', 'probability'][q]; return; }
        td.textContent = [DATA.classes[r - 1], fmt(logits[r - 1]), (100 * probs[r - 1]).toFixed(2) + '%'][q];
      }));
    }
  }
  function lastLinear() {
    var ids = DATA.layers.filter(function (l) { return l.kind === 'linear'; });
    return ids.length ? ids[ids.length - 1].id : null;
  }
  function sameAsLogits() {
    var id = lastLinear(), v = values(id), logits = image().logits;
    return v.length === logits.length && v.every(function (x, k) { return Math.abs(x - logits[k]) <= 1e-5 * Math.max(1, Math.abs(x)); });
  }

  function blockDetail(body, l, c, i, j, stored) {
    if (!l.sum_of || l.residual === false) {
      body.appendChild(el('p', 'note', 'Open the block to see its layers.'));
      return;
    }
    var main = l.children.filter(function (id) { return id !== l.sum_of && id.indexOf(l.id + '.downsample') !== 0; });
    var mid = main[main.length - 1], msh = shapeOf(mid), sumId = l.sum_of + '/in', ssh = shapeOf(sumId);
    var short = l.shortcut === 'identity' ? l.src : l.shortcut, tsh = shapeOf(short);
    var mv = at(values(mid), msh, c, i, j), sv = at(values(sumId), ssh, c, i, j);
    body.appendChild(el('p', 'note', 'The block\u2019s output at this pixel: main path (' + mid + ') + shortcut (' +
      (l.shortcut === 'identity' ? 'identity' : l.shortcut) + '), then ' + LAYERS[l.sum_of].label + '.'));
    body.appendChild(result('main path:', mv, 'detail-main'));
    var shortValue = at(values(short), tsh, c, i, j);
    body.appendChild(result('shortcut:', shortValue, 'detail-shortcut'));
    body.appendChild(result('sum =', mv + shortValue, 'detail-sum'));
    check(mv + shortValue, sv, Math.abs(mv) + Math.abs(shortValue));
    var value = LAYERS[l.sum_of].label === 'ReLU' ? Math.max(0, sv) : stored;
    body.appendChild(result(LAYERS[l.sum_of].label + ' =', value, 'detail-value'));
    check(value, stored, Math.abs(sv));
    var b = el('button', '', 'open block');
    b.addEventListener('click', function () { openBlock(l.id); });
    body.appendChild(b);
  }

  // ------------------------------------------------------------------------------------ probabilities, CAM

  function renderProbs() {
    var box = $('probs'), im = image();
    box.replaceChildren();
    var order = im.probs.map(function (p, k) { return k; });
    order.sort(function (a, b) { return im.probs[b] - im.probs[a]; });
    order.slice(0, 10).forEach(function (k) {
      var row = el('div', 'bar' + (k === im.pred ? ' pred' : '') + (k === im.label ? ' truth' : ''));
      row.appendChild(el('span', 'name', DATA.classes[k]));
      var f = el('span', 'fill');
      f.style.width = (20 * im.probs[k]) + 'em';
      row.appendChild(f);
      var t = el('span', 'p', (100 * im.probs[k]).toFixed(2) + '%');
      t.id = 'prob-' + k; t.dataset.value = im.probs[k];
      row.appendChild(t);
      box.appendChild(row);
    });
    if (order.length > 10) box.appendChild(el('p', 'note', 'the 10 most probable of ' + order.length + ' classes'));
  }

  function renderCam() {
    var im = image(), sel = $('cam-class'), keep = sel.value;
    $('cam-layer').textContent = DATA.cam_layer;
    sel.replaceChildren();
    Object.keys(im.cams).forEach(function (k) {
      var o = el('option', '', DATA.classes[+k] + (+k === im.pred ? ' (predicted)' : '') +
                 ' ' + (100 * im.probs[+k]).toFixed(1) + '%');
      o.value = k;
      sel.appendChild(o);
    });
    sel.value = im.cams[keep] !== undefined && S.camKept ? keep : String(im.pred);
    if (sel.value === '') sel.value = Object.keys(im.cams)[0];
    $('cam-input').src = im.preview;
    showCam();
  }
  function showCam() {
    var k = $('cam-class').value, im = image();
    $('cam-img').src = im.cams[k];
    $('cam-img').dataset.cls = k;
    $('cam-caption').textContent = 'Grad-CAM for ' + DATA.classes[+k];
  }

  // ------------------------------------------------------------------------------------------------ images

  function renderThumbs() {
    var box = $('thumbs');
    box.replaceChildren();
    DATA.images.forEach(function (im, k) {
      var b = el('button', 'thumb');
      b.id = 'thumb-' + k;
      b.setAttribute('role', 'listitem');
      b.setAttribute('aria-pressed', String(k === S.img));
      var img = el('img');
      img.src = im.preview; img.alt = im.name;
      b.appendChild(img);
      b.appendChild(el('span', 'name', im.name));
      var verdict = DATA.classes[im.pred] + ' ' + (100 * im.probs[im.pred]).toFixed(0) + '%';
      var v = el('span', 'verdict' + (im.label === null || im.label === undefined ? '' : im.label === im.pred ? ' right' : ' wrong'),
                 im.label === null || im.label === undefined ? verdict :
                 (im.label === im.pred ? '\u2713 ' : '\u2717 ') + verdict + (im.label === im.pred ? '' : ' (true: ' + DATA.classes[im.label] + ')'));
      v.id = 'verdict-' + k;
      b.appendChild(v);
      b.addEventListener('click', function () { select(k); });
      box.appendChild(b);
    });
  }

  function select(k) {
    S.img = k;
    renderThumbs();
    renderOverview();
    renderProbs();
    renderCam();
    if (!$('block-section').hidden) openBlock($('block-name').textContent);
    if (S.layer !== null) showDetail();
    document.documentElement.setAttribute('data-image', String(k));
  }

  // --------------------------------------------------------------------------------------------- live mode

  function send(form, what) {
    $('live-status').textContent = 'computing ' + what + '\u2026';
    return fetch('v1/explain', { method: 'POST', body: form }).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(body.detail || r.statusText);
        return body;
      });
    }).then(function (body) {
      DATA.images.push(body.image);
      $('live-status').textContent = what + ': ' + DATA.classes[body.image.pred];
      $('live-status').dataset.cls = DATA.classes[body.image.pred];
      select(DATA.images.length - 1);
    }).catch(function (e) {
      $('live-status').textContent = 'refused: ' + e.message;
      $('live-status').dataset.cls = '';
    });
  }
  function sendFile(file) {
    var form = new FormData();
    form.append('file', file, file.name || 'pasted.png');
    return send(form, file.name || 'pasted image');
  }
  function setupLive() {
    $('live-controls').hidden = false;
    $('upload').addEventListener('change', function () { if (this.files.length) sendFile(this.files[0]); });
    var drop = $('drop');
    drop.addEventListener('dragover', function (e) { e.preventDefault(); drop.classList.add('over'); });
    drop.addEventListener('dragleave', function () { drop.classList.remove('over'); });
    drop.addEventListener('drop', function (e) {
      e.preventDefault(); drop.classList.remove('over');
      if (e.dataTransfer.files.length) sendFile(e.dataTransfer.files[0]);
    });
    document.addEventListener('paste', function (e) {
      var items = (e.clipboardData || {}).files || [];
      if (items.length) sendFile(items[0]);
    });
    var pick = $('test-pick');
    pick.appendChild(el('option', '', '\u2014'));
    (DATA.test_images || []).forEach(function (name, k) {
      var o = el('option', '', name); o.value = String(k); pick.appendChild(o);
    });
    pick.addEventListener('change', function () {
      if (pick.value === '' || pick.value === '\u2014') return;
      var form = new FormData();
      form.append('test_index', pick.value);
      send(form, DATA.test_images[+pick.value]);
    });
  }

  // -------------------------------------------------------------------------------------------------- start

  $('title').textContent = DATA.title;
  $('budget-note').textContent = DATA.note;
  $('cam-class').addEventListener('change', function () { S.camKept = true; showCam(); });
  function pixelChanged() {
    var sh = shapeOf(S.layer);
    S.i = Math.max(0, Math.min(sh.H - 1, +$('pixel-row').value || 0));
    S.j = Math.max(0, Math.min(sh.W - 1, +$('pixel-col').value || 0));
    showDetail();
  }
  $('pixel-row').addEventListener('change', pixelChanged);
  $('pixel-col').addEventListener('change', pixelChanged);
  $('detail-map').addEventListener('click', function (e) {
    var sh = shapeOf(S.layer), r = this.getBoundingClientRect();
    if (sh.flat) {
      S.i = Math.min(sh.C - 1, Math.floor((e.clientY - r.top) / r.height * sh.C));
    } else {
      S.i = Math.min(sh.H - 1, Math.floor((e.clientY - r.top) / r.height * sh.H));
      S.j = Math.min(sh.W - 1, Math.floor((e.clientX - r.left) / r.width * sh.W));
      $('pixel-row').value = S.i; $('pixel-col').value = S.j;
    }
    showDetail();
  });
  if (LIVE) setupLive();
  if (DATA.images.length) select(0);
  window.cnnlabExplain = { open: openDetail, openBlock: openBlock, select: select, data: DATA };
  document.documentElement.setAttribute('data-errors', String(cnnlabErrors.length));
  document.documentElement.setAttribute('data-ready', '1');
})();
