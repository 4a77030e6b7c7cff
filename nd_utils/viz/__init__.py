"""Looking at results: plots for the notebooks, the run reader, the HTML report, the explorer
and the regenerated `figures/`.

Modules: `activation_plots`, `label_plots`, `dnd_plots`, `quality_plots` (matplotlib figures the
notebooks draw), `run_folders` (a finished run folder as tables), `report` (static HTML),
`explorer` (ipywidgets over a run) and `figures` (PNG + PDF + JSON provenance). Their public
verbs are also top-level names of `nd_utils` (`nd.plot_evaluation`, `nd.write_report`, ...).
"""
