pub mod diff;
pub mod glob;
pub mod plan;
pub mod run;
pub mod secrets;
pub mod stack;
