pub mod diff;
pub mod glob;
pub mod plan;
