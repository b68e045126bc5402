"""``llmrouter bench``: gateway overhead and local-provider throughput, printed as tables.

The modules import nothing heavy at package import; the command wires them together.
"""
