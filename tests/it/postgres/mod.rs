mod consume;
mod publish;
mod registry;
mod sql_surface;
