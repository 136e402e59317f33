pub mod diff;
pub mod glob;
pub mod plan;
pub mod secrets;
pub mod stack;
