"""dsla: distil a Llama's softmax attention into dual-state linear attention and serve it."""

__version__ = "0.1.0"
