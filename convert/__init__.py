"""Weight conversion between the reference's safetensors checkpoints and our Orbax checkpoint directory.

- `convert.writer.convert(src, dst, ...)`: reference dir -> ours (streaming, atomic).
- `convert.export_safetensors.export(src, dst, ...)`: ours -> reference dir.
- `convert.reader.open_reference(dir)`: parse + validate a reference checkpoint from headers alone.
- CLI: `pdlm-convert` / `python -m convert`; benchmark: `python -m convert.bench`.
"""
