"""MultiFusion: identify nanomaterials in electron micrographs with Hierarchical Network
Fusion (patch sequences + patch graphs at several scales) and LLM-written class
descriptions, fused by cross-modal attention."""

__version__ = "0.1.0"
