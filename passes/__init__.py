"""FX passes: canonicalize, match, analyze, rewrite (installed as ``attn_compiler.passes``)."""
