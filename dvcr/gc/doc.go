// Package gc frees the blobs of deleted DVCR images while the registry keeps
// serving reads and writes.
//
// Distribution's stock garbage-collect must run against a stopped or
// read-only registry: it marks what manifests reference and then deletes
// everything else, so a push that uploads a blob (or finds it "already there")
// after the mark and links it from a manifest before the sweep would lose it.
// This collector closes that gap with three rules instead of a read-only
// window:
//
//  1. Grace. A blob whose data was written less than Grace before the pass
//     started is never a candidate: freshly uploaded blobs are not yet
//     referenced by design.
//  2. Leases. Guard, the middleware in front of distribution's handler, records
//     a lease (digest → time) for every blob a request is about to rely on:
//     blob HEAD/GET (a pusher's "already there?" check), an upload commit, a
//     cross-repository mount and every blob and child manifest named by a
//     manifest PUT (plus the manifest itself, whose blob may survive from a
//     deleted revision). Leases are written through the storage driver under
//     /vimg/leases so that replicas sharing S3 see each other's. A blob leased
//     less than Grace before the pass started is kept.
//  3. Exclusion. Within one process the short requests above run under a read
//     lock and the sweep re-checks the lease and deletes a blob (and its
//     repository links) under the write lock. A pass also takes the write lock
//     once when it starts, so every guarded request either finished before the
//     mark began (and the mark sees its effect) or leases after the pass
//     started (and the sweep sees the lease). Hence, in one replica, a manifest
//     PUT either sees its blobs, which then survive, or fails with
//     BLOB_UNKNOWN; it never leaves a manifest pointing at a deleted blob.
//     Long requests (blob GET, blob data in PATCH/PUT bodies) are not held
//     under the lock: GET only leases, a commit with a body takes the lock
//     once its body has been read.
//
// Remaining window with several replicas: another replica's requests do not
// take this process's lock. If replica B leases a blob and verifies it exists
// in the few milliseconds between replica A reading "no lease" and deleting
// it, B may accept a manifest whose blob A then deletes. That needs a blob
// that is unreferenced, older than Grace, not leased within Grace, and then
// re-referenced by a push landing exactly in that interval; keep Grace long
// (an hour) so that only a push reusing layers of an image deleted more than
// Grace ago, racing the sweep of that very blob, is exposed. Running the
// collector in a single replica (leader election) removes the window for that
// replica's requests only, not for the others.
//
// Lease times are written by each replica's clock and compared with the
// collecting replica's: clock skew between replicas must stay far below
// Grace.
//
// Wiring, in the server:
//
//	c, err := gc.New(storageDriver, gc.Options{Grace: time.Hour, Interval: 10 * time.Minute, Registerer: reg})
//	handler := authenticate(c.Guard(registryApp)) // Guard innermost: no leases for rejected requests
//	go c.Run(ctx)
//
// The registry must not use distribution's blob descriptor cache
// (storage.cache.blobdescriptor): a cached descriptor outlives the deletion
// of its blob and would let a manifest PUT pass verification.
package gc
