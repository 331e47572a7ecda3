//! Throwaway Docker sandboxes (bollard).
