"""Block-sparse paged decode (placeholder: being written for the decode issue)."""


def get_supported_head_sizes():
    return [64, 80, 96, 128, 256]


def forward_decode(*args, **kwargs):
    raise NotImplementedError("forward_decode is not written yet")
