"""How an adapter's factors are held: the VB-LoRA code layout (:mod:`.layout`) and the codecs a collection
stores an adapter with (:mod:`.base` names the seam; :mod:`.bank` is the vector-bank codec)."""
