"""What differs between the timm model families dynvit patches.

:class:`dynvit.model.DynViTMixin` writes the masked and pruned passes once; a family supplies
the embedding, the way a block is called, the masked arithmetic of its blocks and its pooling:

* :mod:`.vit`: ``VisionTransformer`` (checks and the masked function of each block type);
* :mod:`.eva`: ``Eva`` (rotary position embeddings, Eva blocks, :class:`~.eva.EvaMixin`);
* :mod:`.pool`: average and attention pooling over weighted tokens (both families);
* :mod:`.masked`: the masked softmax they share (pure tensor functions).

:mod:`.eva` imports :mod:`dynvit.model`, so this package imports none of its modules itself.
"""
