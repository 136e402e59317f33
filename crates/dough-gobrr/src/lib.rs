pub mod glob;
pub mod plan;
