// Package upload is the upload gateway: it receives the bytes of a
// VirtualImage or ClusterVirtualImage with dataSource type Upload over
// HTTPS (`curl -T disk.qcow2 URL`, `vimg upload`) and streams them, as they
// are, into a blob of the image's DVCR repository, through a distribution
// blob upload session. Nothing touches a disk on the way, and an upload cut
// off resumes where it stopped (docs/upload.md has the protocol).
//
// The controller writes one Secret per image waiting for an upload into a
// namespace of their own (package worker/api); the gateway authenticates
// requests against it, keeps the upload's state on it (api.UploadState:
// bytes received, the DVCR session and the SHA-256 state of what it holds)
// and marks it done once the blob is committed. The controller then imports
// the blob like any other source. Every replica of the gateway can serve
// every upload: the state lives in the Secret, and a lease on it
// (AnnotationHolder) keeps two requests from receiving one upload at once.
//
// What survives what:
//   - a client that goes away, or is idle for 2 minutes: the DVCR request
//     fed by its body is ended cleanly, so DVCR keeps exactly the bytes
//     received and the state says so; the client resumes from there;
//   - the gateway shutting down (SIGTERM): the same, for every upload in
//     progress, and the clients are told to resume (503);
//   - a gateway that dies while receiving, or a DVCR failure in the middle
//     of a request: DVCR's session then holds bytes no state describes (a
//     session cannot be truncated), which the next HEAD or PUT detects;
//     the upload starts over from byte 0 and the answer says so.
package upload
