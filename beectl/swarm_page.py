"""`beectl swarm --serve`: one live web page of the swarm (aiohttp; the page polls /api/swarm)."""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from beectl.config import ClientConfig
from beectl.swarm import Swarm
from beectl.swarm_view import swarm_snapshot

REFRESH_MS = 2000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>beed swarm</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { margin: 1.2em 0 .3em; font-size: 16px; }
.bar { display: flex; gap: 2px; margin: .4em 0 .8em; }
.block { flex: 1; height: 28px; min-width: 6px; border-radius: 2px; }
.r0 { background: #d33; } .r1 { background: #e90; } .r2 { background: #7b3; } .r3 { background: #2a6; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
th { border-bottom: 1px solid #999; } .muted { color: #777; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin: 0 4px 0 10px;
  vertical-align: -1px; }
</style></head><body>
<h1>beed swarm</h1>
<p class="muted"><span id="status">loading…</span> · replicas per block:
<span class="swatch r0"></span>none<span class="swatch r1"></span>1<span class="swatch r2"></span>2
<span class="swatch r3"></span>3+</p>
<div id="models"></div>
<script>
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
async function refresh() {
  let data;
  try {
    const response = await fetch("/api/swarm", {cache: "no-store"});
    data = await response.json();
  } catch (e) {
    document.getElementById("status").textContent = "cannot read the swarm: " + e;
    return;
  }
  const parts = [];
  for (const m of data.models) {
    const blocks = m.replicas.map((n, i) =>
      `<div class="block r${Math.min(n, 3)}" data-block="${i}" data-replicas="${n}" ` +
      `title="block ${i}: ${n} replica(s)"></div>`).join("");
    const rows = m.servers.map((s) =>
      `<tr class="server" data-peer="${esc(s.peer_id)}"><td>${s.blocks[0]}:${s.blocks[1]}</td>` +
      `<td>${esc(s.state)}</td><td>${esc(s.host)}:${s.port}</td><td>${esc(s.quant && s.quant !== "none" ? s.quant : s.dtype)}</td>` +
      `<td>${Math.round(s.compute_tokens_per_s)}</td><td>${s.free_kv_tokens}</td>` +
      `<td>${esc(s.software_version)}</td><td class="muted">${esc(s.peer_id)}</td></tr>`).join("");
    const gaps = m.uncovered_blocks.length ? `${m.uncovered_blocks.length} blocks uncovered` : "all blocks covered";
    parts.push(`<section class="model" data-model="${esc(m.model)}"><h2>${esc(m.model)} ` +
      `<span class="muted">${m.num_blocks} blocks, ${m.servers.length} servers, ${gaps}</span></h2>` +
      `<div class="bar">${blocks}</div><table><tr><th>blocks</th><th>state</th><th>address</th>` +
      `<th>dtype</th><th>tok/s/block</th><th>free KV</th><th>version</th><th>peer</th></tr>` +
      `${rows}</table></section>`);
  }
  document.getElementById("models").innerHTML = parts.join("") || "<p>no models are served</p>";
  document.getElementById("status").textContent =
    "updated " + new Date().toLocaleTimeString() + " (every __REFRESH__ ms)";
}
refresh();
setInterval(refresh, __REFRESH__);
</script></body></html>
""".replace("__REFRESH__", str(REFRESH_MS))


def page_app(swarm: Swarm, model_name: str | None) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def api(request: web.Request) -> web.Response:
        models = await swarm_snapshot(swarm, model_name)
        return web.json_response({"models": models}, dumps=json.dumps)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/swarm", api)
    return app


async def serve_page(config: ClientConfig, host: str, port: int, model_name: str | None) -> None:
    swarm = Swarm(config)
    await swarm.start()
    runner = web.AppRunner(page_app(swarm, model_name), access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1]) if runner.addresses else port
        print(f"ready http://{host}:{bound}", flush=True)
        sys.stdout.flush()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await swarm.aclose()
