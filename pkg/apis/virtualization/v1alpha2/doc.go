// Package v1alpha2 holds the VirtualImage and ClusterVirtualImage API of the
// virtualization.deckhouse.io group, the disk-image data sources that vimg
// imports, stores in DVCR or in a PVC, and hands to volumes.
//
// The schema is wire-compatible with the upstream Deckhouse Virtualization
// v1alpha2 resources (every manifest of its user docs applies unchanged) and
// adds optional HTTP fields upstream lacks: insecureSkipVerify, authSecretRef
// and headers.
//
// +kubebuilder:object:generate=true
// +groupName=virtualization.deckhouse.io
package v1alpha2
