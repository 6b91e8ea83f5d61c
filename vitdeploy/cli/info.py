"""`vitdeploy info`."""

from __future__ import annotations

from vitdeploy import __version__
from vitdeploy.cli.app import main, make_console


# ---------------------------------------------------------------------------------------------
@main.command()
def info() -> None:
    """Versions of the libraries vitdeploy uses, GPUs, and which backends work here."""
    from vitdeploy.sysinfo import collect

    data = collect()
    con = make_console()
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"vitdeploy {__version__}", show_header=True)
    table.add_column("component")
    table.add_column("status")
    for key, value in data["libraries"].items():
        table.add_row(key, value or "[dim]not installed[/dim]")
    table.add_row("cpu", f"{data['machine']['cpu']} ({data['machine']['cores']} cores)")
    gpus = data["machine"]["gpus"]
    table.add_row("cuda devices", ", ".join(gpus) if gpus else "none")
    from vitdeploy.sysinfo import TRT_FLAVOURS

    for g in data["gpu_flavours"]:
        runs = " or ".join(TRT_FLAVOURS[f] for f in g["trt_flavours"])
        note = f" [yellow]({escape(g['note'])})[/yellow]" if g["note"] else ""
        table.add_row(f"gpu {g['index']} engines", f"{escape(g['name'])} ({g['compute_capability']}): {runs}{note}")
    for name, ok in data["backends"].items():
        status = "[green]usable[/green]" if ok is True else f"[yellow]{escape(str(ok))}[/yellow]"
        table.add_row(f"backend {name}", status)
    con.print(table)
