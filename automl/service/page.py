"""The status page at ``/``: server-rendered HTML, no JavaScript. A login form takes a token once and sets an
HttpOnly, SameSite=Strict session cookie; the page lists the sweeps the token may see, with their state, owner, a
progress bar, the best value and a link to the sweep's parent run in the MLflow UI (on its runs view). While a sweep
is queued or running the page refreshes itself every few seconds (otherwise every 15 s)."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from automl.service.store import Principal

REFRESH_SECONDS = 3  # while a sweep is queued or running
IDLE_REFRESH_SECONDS = 15  # otherwise: a sweep someone submits appears without a reload

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;width:100%}th,td{padding:.35rem .6rem;border-bottom:1px solid #ddd;text-align:left}
th{font-weight:600;background:#f6f6f6}.bar{width:10rem;height:.7rem;background:#eee;border-radius:3px}
.bar>div{height:100%;background:#2f7d32;border-radius:3px}.state{font-weight:600}
.QUEUED{color:#666}.RUNNING{color:#1565c0}.FINISHED{color:#2e7d32}.FAILED{color:#c62828}.CANCELLED{color:#8d6e63}
form.inline{display:inline}.error{color:#c62828}header{display:flex;justify-content:space-between}
"""


def _page(title: str, body: str, *, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def login(*, error: str | None) -> str:
    message = f'<p class="error" id="error">{escape(error)}</p>' if error else ""
    return _page("automl: sign in", f"""
<h1>automl</h1>
<p>Sign in with a token (<code>automl token create NAME --role user</code> prints one).</p>{message}
<form method="post" action="/login">
  <label>Token <input type="password" name="token" id="token" autocomplete="off" size="60" required></label>
  <button type="submit" id="sign-in">Sign in</button>
</form>""")


def index(sweeps: list[dict[str, Any]], who: Principal) -> str:
    rows = "".join(_row(s) for s in sweeps) or '<tr><td colspan="7">No sweeps yet.</td></tr>'
    active = any(s["state"] in ("QUEUED", "RUNNING") for s in sweeps)
    return _page("automl sweeps", f"""
<header><h1>automl sweeps</h1>
<form class="inline" method="post" action="/logout"><span>{escape(who.name)} ({escape(who.role)})</span>
<button type="submit">Sign out</button></form></header>
<table id="sweeps"><thead><tr><th>sweep</th><th>state</th><th>owner</th><th>progress</th><th>trials</th>
<th>best</th><th>MLflow</th></tr></thead><tbody>{rows}</tbody></table>""",
                 refresh=REFRESH_SECONDS if active else IDLE_REFRESH_SECONDS)


def _row(sweep: dict[str, Any]) -> str:
    trials = sweep.get("trials") or {}
    total = (sweep.get("budget") or {}).get("trials") or 0
    done = sum(int(trials.get(k, 0)) for k in ("complete", "stopped", "failed"))
    done += max(0, int(trials.get("total", 0)) - done - int(trials.get("running", 0)))  # killed ones count too
    share = min(100.0, 100.0 * done / total) if total else 0.0
    best = sweep.get("best")
    value = "-" if not best or best.get("value") is None else f"{best['value']:.4g} (trial {best['number']})"
    url = (sweep.get("mlflow") or {}).get("url")
    link = f'<a href="{escape(url)}" class="mlflow">parent run</a>' if url else "-"
    state = escape(sweep["state"])
    error = f'<div class="error">{escape(sweep["error"])}</div>' if sweep.get("error") else ""
    return (f'<tr id="sweep-{escape(sweep["id"])}" data-done="{done}" data-total="{total}">'
            f'<td>{escape(sweep["name"])}<div><small>{escape(sweep["id"])}</small></div></td>'
            f'<td class="state {state}">{state}{error}</td><td>{escape(sweep["owner"])}</td>'
            f'<td><div class="bar" title="{done} of {total}"><div style="width:{share:.0f}%"></div></div></td>'
            f'<td class="count">{done} / {total}</td><td>{escape(value)}</td><td>{link}</td></tr>')
