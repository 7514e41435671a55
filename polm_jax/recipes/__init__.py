"""End-to-end runs behind the `polm` commands: each wires a data pipeline and a loss into the shared Session."""
