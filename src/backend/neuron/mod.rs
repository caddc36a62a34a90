//! The Neuron path (issue 12, in progress): XLA HLO graphs emitted by kvgen for neuronx-cc. So far
//! the wire format (`hlo::proto`) and a shape-checked module builder (`hlo::builder`), checked
//! against XLA:CPU by `tests/test_neuron_hlo.py`; the recording `Ops` backend, export, compile
//! and the libnrt runtime come next.

pub mod hlo;
