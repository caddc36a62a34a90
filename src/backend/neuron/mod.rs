//! The Neuron path (issue 12, in progress): XLA HLO graphs emitted by kvgen for neuronx-cc. So far
//! the wire format (`hlo::proto`), a shape-checked module builder (`hlo::builder`), and the
//! recording backend (`record`): the family forward of `model/` run through an `Ops` that emits
//! HLO, one graph for every rank of a tensor-parallel plan. `tests/test_neuron_hlo.py` runs the
//! emitted bytes on XLA:CPU with two replicas. Export/manifest, buckets and decode graphs,
//! neuronx-cc and the libnrt runtime come next.

pub mod hlo;
pub mod record;
