def LocalStridedBlockSparseAttn(): pass
def blocksparse_prefill(): pass
