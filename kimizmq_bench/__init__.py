"""`kimi bench`, kept apart from the product: no `kimi` command but `kimi bench` imports it.

rows.py       one measurement (`Row`), a run's settings, the prompts
reference.py  mlx-lm alone and mlx-lm's own pipeline, in processes of their own
driver.py     kimizmq: a loopback cluster measured over HTTP
report.py     the table, the ratios BENCHMARKS.md states goals for, the plot
cli.py        the command
"""
