mod consume;
mod plans;
mod publish;
mod registry;
mod sql_surface;
mod wakeups;
mod worker;
